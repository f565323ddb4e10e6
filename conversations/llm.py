"""The only code that talks to the model server (Ollama, llama.cpp, vLLM,
LM Studio, OpenAI: anything that speaks OpenAI chat completions)."""

import asyncio
import json
import logging
import time
import weakref
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import httpx2 as httpx  # the HTTP library openai 3 is built on
import openai
from django.conf import settings

from .protocol import OPTION_RANGES, ErrorCode

logger = logging.getLogger(__name__)

# What users see of a message from the model server, and what the log and
# the admin keep of it: a server may answer an error with megabytes.
USER_TEXT_LIMIT = 300
DETAIL_LIMIT = 4096
UNAVAILABLE_TEXT = "The model server is not reachable."


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clean(text: str) -> str:
    """Text from the model server as we can store and send it: a surrogate
    pair joined into its character, a lone surrogate made U+FFFD (neither
    UTF-8, so neither the database nor a socket, can carry one), and NUL
    removed (Postgres cannot keep it; user input refuses it, but a model's
    answer cannot be refused)."""
    if text.isascii():
        return text.replace("\x00", "")
    # UTF-16 joins the pairs a JSON decoder left apart and marks the rest.
    mended = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return mended.replace("\x00", "")


class SurrogateMender:
    """Cleans one streamed field, piece by piece. A UTF-16 server may end a
    piece on the first half of a pair and send the second half next: a
    trailing high surrogate is held until the next piece says which."""

    def __init__(self) -> None:
        self.held = ""

    def feed(self, text: str) -> str:
        text, self.held = self.held + text, ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, self.held = text[:-1], text[-1]
        return clean(text)

    def flush(self) -> str:
        held, self.held = self.held, ""
        return clean(held)


class LLMError(Exception):
    """Anything that went wrong with the model server, with a protocol code:
    upstream_unavailable, model_not_found, upstream_error or timeout.
    message is for users; detail, for the log and staff only, may name the
    server's address and our exceptions."""

    def __init__(self, code: ErrorCode, message: str, detail: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = cut(detail, DETAIL_LIMIT)


@dataclass(frozen=True)
class Delta:
    content: str = ""
    reasoning: str = ""


@dataclass(frozen=True)
class ServedBy:
    """The model id the server says it answered with, which may not be the
    name asked for (a server with one model answers to any name)."""

    model: str


@dataclass(frozen=True)
class LengthCut:
    """The server ended the answer at max_tokens (finish_reason "length")."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int | None
    completion_tokens: int | None


# The largest count the database keeps (PositiveIntegerField on Postgres).
MAX_TOKEN_COUNT = 2**31 - 1


def token_count(value: object) -> int | None:
    """A usage count as the server sent it, or None unless it is a whole
    number the database can keep: a server's bad count must not cost the
    reply its save."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_TOKEN_COUNT else None


# One client per event loop and configuration: making one costs ~20 ms of
# CPU (TLS context), and a shared one keeps connections to the server alive.
# Its connections belong to the loop that opened them, hence the key.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, openai.AsyncOpenAI]]
_clients = weakref.WeakKeyDictionary()


def _client(
    read_timeout: float | None = None, connect_timeout: float | None = None
) -> openai.AsyncOpenAI:
    read = read_timeout or settings.LLM_READ_TIMEOUT
    connect = connect_timeout or settings.LLM_CONNECT_TIMEOUT
    config = (settings.LLM_BASE_URL, settings.LLM_API_KEY, connect, read)
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    client = per_loop.get(config)
    if client is None:
        timeout = openai.Timeout(connect=config[2], read=read, write=10.0, pool=10.0)
        # Retries would only hide a dead server from the user for longer.
        client = openai.AsyncOpenAI(
            base_url=config[0], api_key=config[1], timeout=timeout, max_retries=0
        )
        per_loop[config] = client
    return client


def _as_llm_error(exc: BaseException) -> LLMError:
    if isinstance(exc, LLMError):
        return exc
    if isinstance(exc, (openai.APITimeoutError, httpx.TimeoutException)):
        return LLMError(ErrorCode.TIMEOUT, "The model server took too long to answer.", repr(exc))
    if isinstance(exc, (openai.APIConnectionError, httpx.ConnectError)):
        # The address says how our network is laid out: the log and the
        # admin get it, users a plain sentence.
        detail = f"cannot reach the model server at {settings.LLM_BASE_URL}: {exc!r}"
        logger.warning("%s", detail)
        return LLMError(ErrorCode.UPSTREAM_UNAVAILABLE, UNAVAILABLE_TEXT, detail)
    if isinstance(exc, openai.NotFoundError):
        return _status_error(exc, ErrorCode.MODEL_NOT_FOUND, "The model was not found.")
    if isinstance(exc, openai.APIStatusError):
        fallback = f"The model server answered HTTP {exc.status_code}."
        return _status_error(exc, ErrorCode.UPSTREAM_ERROR, fallback)
    # The texts of the exceptions below say more about us than about the
    # model server: they go to the log, not to the user.
    if isinstance(exc, (httpx.HTTPError, openai.APIError)):
        logger.warning("the model server broke off the answer: %r", exc)
        return LLMError(
            ErrorCode.UPSTREAM_ERROR, "The model server broke off the answer.", repr(exc)
        )
    if isinstance(exc, (ValueError, KeyError, TypeError, AttributeError)):
        logger.warning("the model server sent something that is not a chunk: %r", exc)
        return LLMError(
            ErrorCode.UPSTREAM_ERROR,
            "The model server sent something that is not a chunk.",
            repr(exc),
        )
    logger.error("unexpected error from the model server", exc_info=exc)
    return LLMError(
        ErrorCode.UPSTREAM_ERROR, "The model server's answer failed unexpectedly.", repr(exc)
    )


def _status_error(exc: openai.APIStatusError, code: ErrorCode, fallback: str) -> LLMError:
    """The server's own words reach the user, cut short; the whole answer
    (cut to DETAIL_LIMIT) goes to the log and to staff."""
    message = clean(_status_message(exc, fallback))
    detail = f"HTTP {exc.status_code} from the model server: {message}"
    logger.warning("%s", cut(detail, DETAIL_LIMIT))
    return LLMError(code, cut(message, USER_TEXT_LIMIT), detail)


def _status_message(exc: openai.APIStatusError, fallback: str) -> str:
    body = exc.body
    if isinstance(body, dict):
        detail = body.get("error", body)
        if isinstance(detail, dict) and detail.get("message"):
            return str(detail["message"])
        if isinstance(detail, str):
            return detail
    return fallback


# Per server: when it was asked, and its answer (the models, or the error).
_models_cache: dict[str, tuple[float, list[str] | LLMError]] = {}


async def list_models() -> list[str]:
    """Model ids the server offers, cached for a few seconds so that every
    new socket does not cost a round trip. Failures are cached too: a
    server that is switched off must not hold up every page load for the
    length of a connect timeout."""
    url = settings.LLM_BASE_URL
    now = time.monotonic()
    cached = _models_cache.get(url)
    if cached and now - cached[0] < settings.LLM_MODELS_CACHE_SECONDS:
        if isinstance(cached[1], LLMError):
            raise cached[1]
        return cached[1]
    try:
        client = _client(read_timeout=5.0, connect_timeout=min(2.0, settings.LLM_CONNECT_TIMEOUT))
        page = await client.models.list()
        models = sorted(m.id for m in page.data)
    except Exception as exc:
        error = _as_llm_error(exc)
        _models_cache[url] = (now, error)
        raise error from exc
    _models_cache[url] = (now, models)
    return models


async def model_exists(model: str) -> bool:
    """False only when the server is known to lack the model: it is not in
    the server's list, and asking for it by name (GET /v1/models/{model})
    finds nothing. A server that cannot be reached lacks nothing."""
    try:
        if model in await list_models():
            return True
        await _client().models.retrieve(model)
    except openai.NotFoundError:
        return False
    except (LLMError, openai.OpenAIError):
        return True
    return True


def forget_models() -> None:
    _models_cache.clear()


async def default_model() -> str:
    if settings.DEFAULT_MODEL:
        return settings.DEFAULT_MODEL
    try:
        models = await list_models()
    except LLMError:
        return ""
    return models[0] if models else ""


class ThinkSplitter:
    """Splits a think block out of streamed content. A block counts only
    where models put it, at the start of the answer after optional
    whitespace: a `<think>` later on is text (an answer about the tag), and
    so is everything after the first block. A tag cut across chunks is
    held back until the next chunk decides.

    A model whose chat template opens the block itself sends only its end.
    With `undecided` > 0, an answer that does not open with `<think>` is
    held back, up to that many characters, for a `</think>` that makes what
    came before it reasoning; a `<think>` first, the limit or the end of the
    stream make it content. With 0 it is content at once.

    A block that never closes is sent again as the answer at the end of the
    stream: a model that forgot its closing tag must not leave the answer
    empty."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, undecided: int = 0) -> None:
        self.undecided = undecided
        self.state = "start"  # then "thinking" or "implicit", then "answer"
        self.held = ""
        self.thought: list[str] = []  # an open block's reasoning so far
        self.strip = False  # models put a blank line after </think>

    def feed(self, text: str) -> Delta:
        text, self.held = self.held + text, ""
        reasoning = ""
        if self.state == "start":
            body = text.lstrip()
            if body.startswith(self.OPEN):
                self.state, text = "thinking", body[len(self.OPEN) :]
            elif self.OPEN.startswith(body):  # nothing but whitespace, or a tag begun
                self.held = text
                return Delta()
            else:
                self.state = "implicit" if self.undecided > 0 else "answer"
        if self.state == "implicit":
            close, opened = text.find(self.CLOSE), text.find(self.OPEN)
            if close >= 0 and not 0 <= opened < close:
                reasoning, text = text[:close], text[close + len(self.CLOSE) :]
                self.state, self.strip = "answer", True
            elif opened >= 0 or len(text) > self.undecided:
                self.state = "answer"
            else:
                self.held = text
                return Delta()
        if self.state == "thinking":
            index = text.find(self.CLOSE)
            if index < 0:
                keep = _partial_suffix(text, self.CLOSE)
                self.held = text[len(text) - keep :]
                self.thought.append(text[: len(text) - keep])
                return Delta(reasoning=self.thought[-1])
            reasoning, text = text[:index], text[index + len(self.CLOSE) :]
            self.state, self.strip, self.thought = "answer", True, []
        if self.strip:
            text = text.lstrip()
            self.strip = not text
        return Delta(content=text, reasoning=reasoning)

    def no_tags_needed(self) -> None:
        """The server sends reasoning in a field of its own: an answer that
        does not open with `<think>` is content, not held back."""
        self.undecided = 0

    def flush(self) -> Delta:
        held, self.held = self.held, ""
        if self.state == "thinking":
            # held can only be the start of a </think> that never came.
            thought = "".join(self.thought) + held
            return Delta(content=thought.lstrip(), reasoning=held)
        return Delta(content=held)


def _partial_suffix(text: str, tag: str) -> int:
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def _reasoning_of(delta: Any) -> str:
    extra = getattr(delta, "model_extra", None) or {}
    value = extra.get("reasoning_content") or extra.get("reasoning")
    if value is None:
        value = getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)
    return value if isinstance(value, str) else ""


async def stream_chat(
    messages: list[dict[str, str]], model: str, options: dict[str, Any] | None = None
) -> AsyncGenerator[Delta | ServedBy | LengthCut | Usage, None]:
    """Yield Delta pieces of the answer as they arrive, with one ServedBy
    when the server first names its model, then a LengthCut if the server
    stopped at max_tokens, then one Usage.
    Raises LLMError. Closing the generator closes the HTTP request, which
    is how the model server learns that the user pressed Stop."""
    params = {k: v for k, v in (options or {}).items() if k in OPTION_RANGES and v is not None}
    splitter = ThinkSplitter(settings.LLM_THINK_UNDECIDED_CHARS)
    menders = SurrogateMender(), SurrogateMender()  # content, reasoning
    chunks = 0
    usage: Usage | None = None
    finished = started = named = cut_short = False
    try:
        # openai types messages as TypedDicts per role, and ours are plain
        # dicts of role and content; the options splat as dict[str, Any].
        stream = await _client().chat.completions.create(  # type: ignore[call-overload]
            model=model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **params,
        )
        started = True
        async with stream:
            async for chunk in stream:
                if not named and chunk.model:
                    named = True
                    yield ServedBy(clean(chunk.model))
                if chunk.usage is not None:
                    usage = Usage(
                        token_count(chunk.usage.prompt_tokens),
                        token_count(chunk.usage.completion_tokens),
                    )
                for choice in chunk.choices[:1]:
                    finished = finished or choice.finish_reason is not None
                    cut_short = cut_short or choice.finish_reason == "length"
                    delta = choice.delta
                    if delta is None:
                        continue
                    field = menders[1].feed(_reasoning_of(delta))
                    if field:
                        splitter.no_tags_needed()
                    split = splitter.feed(menders[0].feed(delta.content or ""))
                    reasoning = field + split.reasoning
                    if split.content or reasoning:
                        chunks += 1
                        yield Delta(content=split.content, reasoning=reasoning)
    except GeneratorExit:
        raise
    except json.JSONDecodeError as exc:
        raise LLMError(
            ErrorCode.UPSTREAM_ERROR, "The model server sent a malformed chunk.", repr(exc)
        ) from exc
    except Exception as exc:
        error = _as_llm_error(exc)
        if started and error.code == ErrorCode.UPSTREAM_UNAVAILABLE:
            # The server answered, then the connection dropped mid-answer.
            error = LLMError(
                ErrorCode.UPSTREAM_ERROR, "The model server broke off the answer.", error.detail
            )
        raise error from exc
    if not finished:
        # A connection closed cleanly mid-answer reads like a normal end;
        # only the missing finish_reason tells them apart.
        raise LLMError(
            ErrorCode.UPSTREAM_ERROR, "The model server ended the answer before finishing it."
        )
    last = splitter.feed(menders[0].flush())
    rest = splitter.flush()
    content = last.content + rest.content
    reasoning = menders[1].flush() + last.reasoning + rest.reasoning
    if content or reasoning:
        yield Delta(content=content, reasoning=reasoning)
    if cut_short:
        yield LengthCut()
    # Servers that ignore include_usage still get a count: one chunk is
    # one token for every server we know of.
    yield usage or Usage(None, chunks or None)
