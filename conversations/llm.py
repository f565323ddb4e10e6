"""The only code that talks to the model server (Ollama, llama.cpp, vLLM,
LM Studio, OpenAI: anything that speaks OpenAI chat completions)."""

import asyncio
import email.utils
import json
import logging
import ssl
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import httpx2 as httpx  # the HTTP library openai 3 is built on
import openai
from django.conf import settings
from openai.types.chat import ChatCompletionMessageParam

from . import sse
from .protocol import OPTION_RANGES, ErrorCode

logger = logging.getLogger(__name__)
T = TypeVar("T")

# What users see of a message from the model server, and what the log and
# the admin keep of it: a server may answer an error with megabytes.
USER_TEXT_LIMIT = 300
DETAIL_LIMIT = 4096
UNAVAILABLE_TEXT = "The model server is not reachable."
UNTRUSTED_TEXT = "The model server's certificate is not trusted."
WEB_PAGE_TEXT = "The model server answered with a web page, not a chat answer."
TLS_FAILED_TEXT = "A secure connection to the model server could not be made."

# A server that answers these is busy or still loading its model: it is
# asked once more, after its Retry-After (at most RETRY_AFTER_CAP seconds)
# or RETRY_DELAY. Retries happen only here: the client's own stay off.
RETRIED_STATUSES = (429, 503)
RETRY_DELAY = 1.0
RETRY_AFTER_CAP = 5.0


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
        tls = _tls_cause(exc)
        if tls is not None:
            detail += f" (TLS: {tls!r})"
        logger.warning("%s", detail)
        text = UNAVAILABLE_TEXT
        if isinstance(tls, ssl.SSLCertVerificationError):
            text = UNTRUSTED_TEXT
        elif tls is not None:
            text = TLS_FAILED_TEXT
        return LLMError(ErrorCode.UPSTREAM_UNAVAILABLE, text, detail)
    if isinstance(exc, openai.NotFoundError):
        return _status_error(exc, ErrorCode.MODEL_NOT_FOUND, "The model was not found.")
    if isinstance(exc, openai.APIStatusError) and exc.status_code in (401, 403):
        # The server's words ("Incorrect API key provided: sk-ab***cd")
        # may quote the key: users learn who can fix it, staff the rest.
        text = f"The model server refused our API key (HTTP {exc.status_code})."
        text += " An administrator must set LLM_API_KEY."
        return _status_error(exc, ErrorCode.UPSTREAM_ERROR, text, own_words=False)
    if isinstance(exc, openai.APIStatusError) and exc.status_code in RETRIED_STATUSES:
        text = f"The model server is busy (HTTP {exc.status_code}); try again in a moment."
        return _status_error(exc, ErrorCode.UPSTREAM_ERROR, text, own_words=False)
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


def _status_error(
    exc: openai.APIStatusError, code: ErrorCode, fallback: str, own_words: bool = True
) -> LLMError:
    """The server's own words reach the user, cut short, unless own_words
    is False (then the fallback does); the whole answer (cut to
    DETAIL_LIMIT) goes to the log and to staff."""
    message = clean(_status_message(exc, fallback))
    detail = f"HTTP {exc.status_code} from the model server: {message}"
    if isinstance(exc.body, str) and exc.body:  # not JSON: a proxy's page, say
        detail += f"; its answer: {clean(exc.body)}"
    logger.warning("%s", cut(detail, DETAIL_LIMIT))
    return LLMError(code, cut(message if own_words else fallback, USER_TEXT_LIMIT), detail)


def _tls_cause(exc: BaseException) -> ssl.SSLError | None:
    """The TLS failure behind a connection error, if one is: openai wraps
    httpx's ConnectError, which wraps the ssl module's exception."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, ssl.SSLError):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None


def retry_delay(retry_after: str | None, now: float | None = None) -> float:
    """Seconds to wait before asking a busy server again: its Retry-After,
    in seconds or as an HTTP date, at most RETRY_AFTER_CAP; RETRY_DELAY
    if it says nothing we can read."""
    if not retry_after:
        return RETRY_DELAY
    try:
        seconds = float(retry_after)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(retry_after)
        except (TypeError, ValueError):
            return RETRY_DELAY
        if when.tzinfo is None:
            return RETRY_DELAY
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return RETRY_DELAY
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


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


# Per server and model name: when the server last said it has a model that
# its list leaves out (a name with a tag, say), so that every message sent
# with that name does not cost another round trip.
_found_cache: dict[tuple[str, str], float] = {}


async def model_exists(model: str) -> bool:
    """False only when the server is known to lack the model: it is not in
    the server's list, and asking for it by name (GET /v1/models/{model})
    finds nothing. A server that cannot be reached lacks nothing."""
    key = (settings.LLM_BASE_URL, model)
    found = _found_cache.get(key)
    if found is not None and time.monotonic() - found < settings.LLM_MODELS_CACHE_SECONDS:
        return True
    try:
        if model in await list_models():
            return True
        await _client().models.retrieve(model)
    except openai.NotFoundError:
        return False
    except (LLMError, openai.OpenAIError):
        return True
    if len(_found_cache) > 1000:  # names are the users' to choose
        _found_cache.clear()
    _found_cache[key] = time.monotonic()
    return True


def forget_models() -> None:
    _models_cache.clear()
    _found_cache.clear()


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


def without_reasoning(text: str) -> str:
    """A whole (not streamed) answer's text without its think block: what
    follows the last `</think>`, which also covers a template that opened
    the block itself; nothing if a block opened and never closed (the answer
    was cut inside its reasoning)."""
    close = text.rfind(ThinkSplitter.CLOSE)
    if close >= 0:
        return text[close + len(ThinkSplitter.CLOSE) :]
    if text.lstrip().startswith(ThinkSplitter.OPEN):
        return ""
    return text


# A title request (conversations/titles.py) is a few words: small enough a
# cap that a model cannot hold a slot of the server for long, and a
# deadline for the whole request, retries none.
TITLE_MAX_TOKENS = 32
TITLE_TIMEOUT = 30.0


async def complete_title(messages: list[dict[str, str]], model: str) -> str:
    """The model's answer to a title request, in one piece (not streamed),
    its reasoning left out: a reasoning field is ignored, a think block cut
    off. Raises LLMError, a timeout after TITLE_TIMEOUT seconds included."""
    try:
        async with asyncio.timeout(TITLE_TIMEOUT):
            completion = await _client().chat.completions.create(
                model=model,
                # Our plain dicts of role and content are what these TypedDicts hold.
                messages=cast("list[ChatCompletionMessageParam]", messages),
                max_tokens=TITLE_MAX_TOKENS,
                stream=False,
                timeout=TITLE_TIMEOUT,
            )
        choices = completion.choices or []
        content = choices[0].message.content if choices else None
    except TimeoutError:
        raise LLMError(
            ErrorCode.TIMEOUT,
            "The model took too long to suggest a title.",
            f"TITLE_TIMEOUT ({TITLE_TIMEOUT:g} s) passed",
        ) from None
    except LLMError:
        raise
    except Exception as exc:
        raise _as_llm_error(exc) from exc
    return without_reasoning(clean(content)) if isinstance(content, str) else ""


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
    finished = started = named = cut_short = answering = False
    loop = asyncio.get_running_loop()
    # Until the model's first token one deadline covers the request, its
    # retry and any chunks without text: loading a model or reading a long
    # prompt may take a CPU server minutes. Then each chunk has
    # LLM_READ_TIMEOUT to come.
    first_wait, idle = settings.LLM_FIRST_TOKEN_TIMEOUT, settings.LLM_READ_TIMEOUT
    deadline = loop.time() + first_wait
    not_started = LLMError(
        ErrorCode.TIMEOUT,
        f"The model did not start answering within {_seconds(first_wait)}.",
        f"LLM_FIRST_TOKEN_TIMEOUT ({first_wait:g} s) passed before the first token",
    )
    stalled = LLMError(
        ErrorCode.TIMEOUT,
        f"The model server stopped sending for {_seconds(idle)}.",
        f"LLM_READ_TIMEOUT ({idle:g} s) passed without a chunk, mid-answer",
    )
    try:
        async with _answer(model, messages, params, deadline, not_started) as response:
            started = True
            kind = response.headers.get("content-type", "")
            if kind.startswith("text/html"):
                # A web page where the API should be: a login portal, or a
                # base URL that names a web UI rather than its API.
                raise LLMError(
                    ErrorCode.UPSTREAM_ERROR,
                    WEB_PAGE_TEXT,
                    f"HTTP {response.status_code} with Content-Type {kind!r}",
                )
            events = sse.Events()
            reads = aiter(response.aiter_bytes())
            done = False
            while not done:
                # One deadline per read of the connection, not per chunk:
                # a read often holds several.
                wait = (loop.time() + idle, stalled) if answering else (deadline, not_started)
                try:
                    data = await _within(*wait, anext(reads))
                    pieces = events.feed(data)
                except StopAsyncIteration:
                    pieces, done = events.finish(), True
                for piece in pieces:
                    if piece.startswith(b"[DONE]"):
                        done = True
                        break
                    chunk = _chunk(sse.loads(piece))
                    if not named and chunk.model:
                        named = True
                        yield ServedBy(clean(chunk.model))
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if chunk.finish_reason is not None:
                        finished = True
                        cut_short = cut_short or chunk.finish_reason == "length"
                    if not (chunk.content or chunk.reasoning):
                        continue
                    field = menders[1].feed(chunk.reasoning)
                    if field:
                        splitter.no_tags_needed()
                    # Text held back (a tag begun) counts: the model has begun.
                    answering = True
                    split = splitter.feed(menders[0].feed(chunk.content))
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
            ErrorCode.UPSTREAM_ERROR,
            "The model server ended the answer before finishing it.",
            f"the stream ended without a finish reason, after {chunks} chunks of text",
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


def _seconds(n: float) -> str:
    return f"{n:g} second" if n == 1 else f"{n:g} seconds"


async def _within(when: float, error: LLMError, work: Awaitable[T]) -> T:
    """Await work, or raise error once the loop's clock passes when."""
    try:
        async with asyncio.timeout_at(when) as window:
            return await work
    except TimeoutError:
        if not window.expired():
            raise  # not ours: some other TimeoutError passing through
        raise error from None


@asynccontextmanager
async def _answer(
    model: str,
    messages: list[dict[str, str]],
    params: dict[str, Any],
    deadline: float,
    late: LLMError,
) -> AsyncIterator[httpx.Response]:
    """The streamed answer's HTTP response, its body still to read, asked
    for once more if the server is busy (RETRIED_STATUSES), unless the wait
    would pass the deadline of the first token (then late is raised). Any
    token comes after this, so a retry never repeats one. The request goes
    through the openai client (its auth, headers and errors); the body is
    ours to read (sse.py)."""
    # Our deadlines bound every wait for the answer; httpx's read timeout
    # would cut the wait for the first token at LLM_READ_TIMEOUT.
    timeout = openai.Timeout(connect=settings.LLM_CONNECT_TIMEOUT, read=None, write=10.0, pool=10.0)
    for attempt in (1, 2):
        # openai types messages as TypedDicts per role, and ours are plain
        # dicts of role and content; the options splat as dict[str, Any].
        request = _client().chat.completions.with_streaming_response.create(  # type: ignore[call-overload]
            model=model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            timeout=timeout,
            **params,
        )
        try:
            response = await _within(deadline, late, request.__aenter__())
        except openai.APIStatusError as exc:
            if attempt == 2 or exc.status_code not in RETRIED_STATUSES:
                raise
            delay = retry_delay(exc.response.headers.get("retry-after"))
            if asyncio.get_running_loop().time() + delay >= deadline:
                raise
            logger.info(
                "the model server answered HTTP %d; asking again in %.1f s", exc.status_code, delay
            )
            await asyncio.sleep(delay)
            continue
        try:
            yield response.http_response
        finally:
            await request.__aexit__(None, None, None)
        return


@dataclass(frozen=True, slots=True)
class _Chunk:
    model: str
    content: str
    reasoning: str
    finish_reason: str | None
    usage: Usage | None


def _chunk(data: Any) -> _Chunk:
    """What we use of one streamed chat-completion chunk, each part checked:
    a server may send anything. Raises ValueError for what is not a chunk,
    LLMError for an error the server reports mid-stream."""
    if not isinstance(data, dict):
        raise ValueError(f"a chunk that is not an object: {data!r:.200}")
    if data.get("error"):
        error = data["error"]
        message = error.get("message") if isinstance(error, dict) else error
        text = clean(str(message or "The model server reported an error mid-answer."))
        logger.warning("the model server reported an error mid-answer: %s", cut(text, 1000))
        raise LLMError(
            ErrorCode.UPSTREAM_ERROR, cut(text, USER_TEXT_LIMIT), f"error event: {data!r}"
        )
    usage = data.get("usage")
    counts = None
    if isinstance(usage, dict):
        counts = Usage(
            token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens"))
        )
    content = reasoning = ""
    finish = None
    choices = data.get("choices")
    if choices:
        if not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise ValueError(f"choices that are not a list of objects: {choices!r:.200}")
        choice = choices[0]
        finish = choice.get("finish_reason")
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content") or ""
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            if not isinstance(content, str):
                raise ValueError(f"content that is not text: {content!r:.200}")
            if not isinstance(reasoning, str):
                reasoning = ""
        elif delta is not None:
            raise ValueError(f"a delta that is not an object: {delta!r:.200}")
    model_name = data.get("model")
    return _Chunk(
        model_name if isinstance(model_name, str) else "",
        content,
        reasoning,
        finish if isinstance(finish, str) else None,
        counts,
    )
