"""Fake OpenAI-compatible chat-completions server for tests (standard library only).

Behaviour is chosen by the model name, so several processes can share one server
without shared state: ``BASE[:key=value,...]``, e.g. ``fake:n=5000,delay=0`` or
``fake:fault=cut,after=5``, ``fake:endless=1,delay=0``. See ``Spec`` for the keys.
Two faults belong to the server rather than to a model: ``FakeLLM(api_key=...)``
answers 401 to any other bearer key, and ``FakeLLM(tls=context)`` serves HTTPS
(with the test's own self-signed certificate, say).

Run standalone with ``python tests/fake_llm.py --port 8911``.

What the server has written for each chat-completions request is kept in
``FakeLLM.sent`` (see ``Sent``), and served as JSON by ``GET /fake/sent``
for a server in its own process; ``POST /fake/reset`` clears it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import ssl
import threading
import time
import traceback
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

MODELS = ("fake", "fake-slow", "fake-think", "fake-reasoning-field", "fake-long")
_DEFAULTS = {"fake-slow": (40, 0.15), "fake-long": (300, 0.005)}  # base -> (n, delay)
_REASONING = [f"r{i}" for i in range(1, 7)]
_HEAD = {"id": "chatcmpl-fake", "created": 0}
# Longer than httpx's keep-alive expiry, so an idle client always hangs up first.
_IDLE_TIMEOUT = 60.0
_MAX_REQUESTS_PER_CONN = 10_000
SENT_LIMIT = 10_000  # requests the sent log keeps, newest last


@dataclass
class Spec:
    base: str
    n: int
    delay: float
    ttft: float = 0.0
    # 500 | huge (a 500 with a 2 MB message) | cut | malformed | stall | html
    # (a 200 whose body is an HTML page) | proxy (a 502 HTML page, as nginx
    # answers for a dead upstream) | pause (silent for `stall` seconds after
    # `after` chunks, then the rest of the answer: after=0 is a model that
    # is slow to start once the headers are out) | 429 | 503 (see times) | nodone (after
    # `after` chunks the stream ends cleanly, with neither a finish reason nor
    # [DONE]: an unfinished answer) | nodone-finish (every chunk and the
    # finish reason, but no [DONE]: a complete answer, as llama.cpp and
    # Ollama may end one).
    fault: str | None = None
    after: int = 3  # chunks sent before a cut/malformed/stall/pause/nodone fault
    # For 429 and 503: how many requests for this model name get the error
    # before one succeeds (counted by the FakeLLM since start or reset);
    # None: every one. A 429 carries retry_after as its Retry-After header.
    times: int | None = None
    retry_after: str = "1"
    stall: float = 30.0
    echo: str | None = None  # "1" (words) | "raw" (5-character chunks)
    served: str | None = None  # the model id the chunks report, as a one-model server does
    # "1": a runaway server that streams w1 w2 w3 … until the client hangs
    # up (ENDLESS_LIMIT at most), ignoring max_tokens; n is ignored.
    endless: str | None = None
    # Text a UTF-16 server or a careless one sends (see MANGLES): put at the
    # end of the first content (and reasoning-field) delta and the start of
    # the second.
    mangle: str | None = None
    # "neg" | "huge" | "float" | "string" | "bool": what usage counts say.
    usage: str | None = None
    # Each content token followed by that many "あ" (3 bytes each in UTF-8):
    # replies of megabytes in a few chunks (issue 10, item 3).
    pad: int = 0
    # "1": each content token is the time it was written ("@1764650000.123456 "),
    # so a benchmark can tell how late it arrives (bench/relay.py).
    stamp: str | None = None
    # The whole content of the answer to a request that is not streamed
    # (the site's title requests): e.g. ``title=<think>hm</think>"Prime numbers."``
    # (no commas). None: such a request is answered with the tokens, as ever.
    title: str | None = None
    # "500" | "stall" (silent for `stall` seconds, then a hang-up): how a
    # request that is not streamed fails, while streamed ones go on as asked.
    titlefault: str | None = None


ENDLESS_LIMIT = 10_000_000
HUGE_ERROR_SIZE = 2_000_000
BAD_GATEWAY_PAGE = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


# mangle -> (end of the first delta, start of the second), and what a client
# must be shown between the two deltas' own text.
MANGLES = {
    "split": (("\ud83d", "\ude00"), "\U0001f600"),  # one emoji, split in two
    "high": (("\ud800", ""), "\ufffd"),  # a lone high surrogate
    "low": (("", "\udc00"), "\ufffd"),  # a lone low surrogate
    "nul": (("\x00", "\x00"), ""),
}
BAD_USAGE: dict[str, Any] = {"neg": -5, "huge": 2**31, "float": 3.5, "string": "7", "bool": True}


def parse_model(model: str) -> Spec:
    """Raise LookupError for an unknown base name, ValueError for bad parameters."""
    base, _, params = model.partition(":")
    if not base.startswith("fake"):
        raise LookupError(model)
    n, delay = _DEFAULTS.get(base, (12, 0.01))
    spec = Spec(base, n, delay)
    for item in filter(None, params.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in Spec.__dataclass_fields__ or key == "base":
            raise ValueError(f"bad model parameter {item!r}")
        if key in ("n", "after", "pad", "times"):
            setattr(spec, key, int(value))
        elif key in ("delay", "ttft", "stall"):
            setattr(spec, key, float(value))
        else:
            setattr(spec, key, value)
    return spec


def _text(content: Any) -> str:
    # Content may be a plain string or a list of OpenAI content parts.
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _words(words: list[str]) -> list[str]:
    return [w + " " for w in words[:-1]] + words[-1:]


def tokens_for(
    model: str, messages: list[dict] | None = None, max_tokens: int | None = None
) -> list[str]:
    """The content tokens the server streams for this model (reasoning excluded)."""
    spec = parse_model(model)
    if spec.echo:
        users = [m for m in messages or [] if m.get("role") == "user"]
        last = _text(users[-1].get("content")) if users else ""
        if spec.echo == "raw":
            tokens = [last[i : i + 5] for i in range(0, len(last), 5)]
        else:
            tokens = _words(last.split())
    else:
        tokens = _words([f"w{i}" + "あ" * spec.pad for i in range(1, spec.n + 1)])
    return tokens[:max_tokens] if max_tokens is not None else tokens


def expected_text(model: str, messages: list[dict] | None = None) -> str:
    return "".join(tokens_for(model, messages))


def reasoning_for(model: str) -> str:
    base = parse_model(model).base
    reasons = base in ("fake-think", "fake-reasoning-field")
    return " ".join(_REASONING) if reasons else ""


def _mend(pieces: list[str], shown: str) -> str:
    return pieces[0] + shown + "".join(pieces[1:]) if len(pieces) > 1 else "".join(pieces)


def mended_text(model: str, messages: list[dict] | None = None) -> tuple[str, str]:
    """(content, reasoning) as a client must be shown them when the server
    mangles its text (the mangle key): the surrogates mended, NUL removed."""
    spec = parse_model(model)
    if not spec.mangle:
        return expected_text(model, messages), reasoning_for(model)
    if spec.base == "fake-think":
        raise ValueError("mangle cuts into the think tags of fake-think")
    shown = MANGLES[spec.mangle][1]
    content = _mend(tokens_for(model, messages), shown)
    reasoning = reasoning_for(model)
    if spec.base == "fake-reasoning-field":
        reasoning = _mend(_words(_REASONING), shown)
    return content, reasoning


@dataclass
class Sent:
    """One chat-completions request and what has been written for it so far,
    updated as each event is handed to the socket: a stream the client cut
    off holds the text that went out before the cut. A soak test compares
    stored replies with it."""

    id: int  # 1, 2, 3, ... since the server started or was reset
    time: float  # time.time() when the request had been read
    model: str
    messages: list
    content: str = ""
    reasoning: str = ""  # from reasoning fields; think tags stay in content
    events: int = 0  # events written that carried text
    finished: bool = False  # the whole answer went out (every chunk of a stream)

    def wrote(self, delta: dict) -> None:
        text = delta.get("content") or ""
        reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
        self.content += text
        self.reasoning += reasoning
        self.events += bool(text or reasoning)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class _Reply:
    model: str
    body: dict
    spec: Spec
    deltas: list[dict]  # one per chunk that carries content or reasoning
    finish: str
    sent: Sent = field(default_factory=lambda: Sent(0, 0.0, "", []))


def _plan(body: dict) -> _Reply:
    model = str(body.get("model", ""))
    spec = parse_model(model)
    tokens = tokens_for(model, body.get("messages"))
    limit, finish = body.get("max_tokens"), "stop"
    if isinstance(limit, int) and limit < len(tokens):
        tokens, finish = tokens[:limit], "length"
    deltas = [{"content": t} for t in tokens]
    r = _words(_REASONING)
    if spec.base == "fake-think":
        # Tags split across chunk boundaries so the client's splitter must buffer.
        think = ["<th", "ink>" + r[0], *r[1:-1], r[-1] + "</th", "ink>"]
        if deltas:
            think[-1] += deltas.pop(0)["content"]
        deltas = [{"content": t} for t in think] + deltas
    elif spec.base == "fake-reasoning-field":
        fields = ("reasoning_content", "reasoning")  # vLLM vs Ollama spelling
        if spec.mangle:
            r = _mangled(r, spec.mangle)
        deltas = [{fields[i % 2]: t} for i, t in enumerate(r)] + deltas
    if spec.mangle:
        contents = [i for i, d in enumerate(deltas) if "content" in d][:2]
        if len(contents) == 2:
            pair = _mangled([deltas[i]["content"] for i in contents], spec.mangle)
            for i, text in zip(contents, pair, strict=True):
                deltas[i] = {"content": text}
    return _Reply(model, body, spec, deltas, finish)


def _mangled(pieces: list[str], how: str) -> list[str]:
    (tail, head), _ = MANGLES[how]
    return [pieces[0] + tail, head + pieces[1], *pieces[2:]]


def _chunk(model: str, delta: dict, finish: str | None = None) -> dict:
    choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {
        **_HEAD,
        "object": "chat.completion.chunk",
        "model": model,
        "choices": choices,
    }


def _usage(body: dict, completion: int) -> dict:
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    p = sum(len(_text(m.get("content")).split()) for m in messages)
    usage = {"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion}
    bad = parse_model(str(body.get("model", ""))).usage
    if bad:
        usage = dict.fromkeys(usage, BAD_USAGE[bad])
    return usage


def _error(message: str, type_: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "code": code}}


class _ClientGone(Exception):
    pass


class FakeLLM:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        tls: ssl.SSLContext | None = None,
        sent_limit: int = SENT_LIMIT,
    ) -> None:
        self.host, self.port = host, port
        # With a key, every request must carry it as its bearer token.
        self.api_key = api_key
        self.tls = tls
        self.requests: list[dict] = []
        self.lookups: list[str] = []  # the paths of GET requests, in order
        # Requests per model name that met its 429 or 503 fault.
        self.refused: dict[str, int] = {}
        # Bounded: a soak runs thousands of requests through one server.
        self.sent: collections.deque[Sent] = collections.deque(maxlen=sent_limit)
        self._sent_ids = 0
        self.cancelled = 0
        self.completed = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._conns: set[asyncio.Task] = set()
        self._startup_error: OSError | None = None

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}/v1"

    def start(self) -> FakeLLM:
        self._thread = threading.Thread(target=self._run, name="fake-llm", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake LLM server did not start")
        if self._startup_error:
            raise self._startup_error
        return self

    def stop(self) -> None:
        if self._loop and self._stop and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(5)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.lookups.clear()
            self.refused.clear()
            self.sent.clear()
            self._sent_ids = 0
            self.cancelled = self.completed = 0

    def sent_log(self) -> list[dict[str, Any]]:
        """The sent log as plain data, oldest first."""
        with self._lock:
            return [record.as_dict() for record in self.sent]

    def _record(self, body: dict) -> Sent:
        messages = body.get("messages")
        with self._lock:
            self._sent_ids += 1
            record = Sent(
                self._sent_ids,
                time.time(),
                str(body.get("model", "")),
                messages if isinstance(messages, list) else [],
            )
            self.sent.append(record)
        return record

    def wait_cancelled(self, n: int = 1, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.cancelled < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.cancelled >= n

    def _refuses(self, model: str, times: int | None) -> bool:
        with self._lock:
            seen = self.refused.get(model, 0)
            if times is not None and seen >= times:
                return False
            self.refused[model] = seen + 1
            return True

    def _count(self, attr: str) -> None:
        with self._lock:
            setattr(self, attr, getattr(self, attr) + 1)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except OSError as exc:  # e.g. port in use: start() re-raises it
            self._startup_error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, self.host, self.port, ssl=self.tls)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        # Python 3.11's Server.close() leaves open connections alone, so end them here.
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            for _ in range(_MAX_REQUESTS_PER_CONN):
                request = await _read_request(reader)
                if request is None or not await self._respond(reader, writer, request):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # client went away, or the server is stopping
        except Exception:
            traceback.print_exc()
        finally:
            self._conns.discard(task)
            writer.close()

    async def _respond(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: tuple
    ) -> bool:
        """Answer one request; return whether the connection may be reused."""
        method, path, raw, headers = req
        path = path.split("?", 1)[0].rstrip("/")
        if method == "GET" and path == "/fake/sent":
            return await _send(writer, 200, self.sent_log())
        if method == "POST" and path == "/fake/reset":
            self.reset()
            return await _send(writer, 200, {"reset": True})
        if method == "GET":
            with self._lock:
                self.lookups.append(urllib.parse.unquote(path))
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            # Word for word what OpenAI answers.
            error = _error("Incorrect API key provided", "invalid_request_error", "invalid_api_key")
            return await _send(writer, 401, error)
        if method == "GET" and path == "/v1/models":
            info = {"object": "model", "created": 0, "owned_by": "fake"}
            data = [{"id": m, **info} for m in MODELS]
            return await _send(writer, 200, {"object": "list", "data": data})
        if method == "GET" and path.startswith("/v1/models/"):
            # Unlisted names with parameters are models too: found when
            # asked for by name, as a server with a partial list answers.
            model = urllib.parse.unquote(path.removeprefix("/v1/models/"))
            try:
                parse_model(model)
            except (LookupError, ValueError):
                error = _error(f'model "{model}" not found', "not_found_error", "model_not_found")
                return await _send(writer, 404, error)
            info = {"id": model, "object": "model", "created": 0, "owned_by": "fake"}
            return await _send(writer, 200, info)
        if method != "POST" or path != "/v1/chat/completions":
            error = _error("not found", "invalid_request_error")
            return await _send(writer, 404, error)
        try:
            body = json.loads(raw)
        except ValueError:
            return await _send(writer, 400, _error("bad JSON", "invalid_request_error"))
        record = None
        if isinstance(body, dict):
            with self._lock:
                self.requests.append(body)
            record = self._record(body)
        try:
            reply = _plan(body)
        except LookupError:
            msg = f'model "{body.get("model")}" not found, try pulling it first'
            error = _error(msg, "not_found_error", "model_not_found")
            return await _send(writer, 404, error)
        except (ValueError, TypeError, AttributeError) as exc:
            return await _send(writer, 400, _error(str(exc), "invalid_request_error"))
        if record is not None:
            reply.sent = record
        spec, stream = reply.spec, bool(body.get("stream"))
        if not stream and (spec.title is not None or spec.titlefault):
            return await self._title(reader, writer, reply)
        if spec.ttft and await _sleep_or_eof(reader, spec.ttft):
            if stream:
                self._count("cancelled")
            return False
        if spec.fault == "500":
            error = _error("fake internal error", "server_error")
            return await _send(writer, 500, error)
        if spec.fault == "huge":
            message = "fake huge error " + "x" * HUGE_ERROR_SIZE
            return await _send(writer, 500, _error(message, "server_error"))
        if spec.fault == "html":
            return await _send(writer, 200, b"<html>oops</html>", "text/html")
        if spec.fault == "proxy":
            return await _send(writer, 502, BAD_GATEWAY_PAGE, "text/html")
        if spec.fault in ("429", "503") and self._refuses(reply.model, spec.times):
            status = int(spec.fault)
            if status == 429:
                error = _error("Rate limit reached, slow down", "rate_limit_error")
                return await _send(writer, 429, error, headers={"Retry-After": spec.retry_after})
            return await _send(writer, 503, _error("Loading model", "unavailable_error"))
        if not stream:
            return await self._complete(reader, writer, reply)
        try:
            if spec.endless:
                await self._stream_endless(reader, writer, reply)
            await self._stream(reader, writer, reply)
        except (ConnectionError, _ClientGone):
            self._count("cancelled")
            return False
        return spec.fault is None

    async def _title(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: _Reply
    ) -> bool:
        spec = reply.spec
        if spec.titlefault == "500":
            return await _send(writer, 500, _error("fake title error", "server_error"))
        if spec.titlefault == "stall":
            await _sleep_or_eof(reader, spec.stall)
            return False  # hang up without a response
        message = {"role": "assistant", "content": spec.title or ""}
        result = {
            **_HEAD,
            "object": "chat.completion",
            "model": reply.model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": _usage(reply.body, len((spec.title or "").split())),
        }
        reply.sent.wrote(message)
        reply.sent.finished = True
        return await _send(writer, 200, result)

    async def _complete(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: _Reply
    ) -> bool:
        spec, deltas = reply.spec, reply.deltas
        if spec.fault in ("cut", "stall"):
            if spec.fault == "stall":
                await _sleep_or_eof(reader, spec.stall)
            return False  # hang up without a response
        if spec.fault == "malformed":
            return await _send(writer, 200, b"{this is not json")
        text = "".join(d.get("content", "") for d in deltas)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        fields = ("reasoning_content", "reasoning")
        if reasoning := "".join(d.get(f, "") for d in deltas for f in fields):
            message["reasoning_content"] = reasoning
        result = {
            **_HEAD,
            "object": "chat.completion",
            "model": reply.model,
            "choices": [{"index": 0, "message": message, "finish_reason": reply.finish}],
            "usage": _usage(reply.body, len(deltas)),
        }
        # Logged as it is handed to the transport: a client reading the
        # answer finds it logged.
        reply.sent.wrote(message)
        reply.sent.finished = True
        return await _send(writer, 200, result)

    async def _stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: _Reply
    ) -> None:
        """Raise _ClientGone or ConnectionError if the client leaves early."""
        spec = reply.spec
        model = spec.served or reply.model
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        events = [_chunk(model, d) for d in reply.deltas]
        events.append(_chunk(model, {}, reply.finish))
        first = events[0]["choices"][0]
        first["delta"] = {"role": "assistant", **first["delta"]}
        if (reply.body.get("stream_options") or {}).get("include_usage"):
            usage = _usage(reply.body, len(reply.deltas))
            events.append({**_chunk(model, {}), "choices": [], "usage": usage})
        # Clamped so the fault fires even when `after` exceeds the content length.
        faulty = spec.fault in ("cut", "malformed", "stall", "nodone", "pause")
        fault_at = min(spec.after, len(reply.deltas)) if faulty else -1
        for i, event in enumerate(events):
            if i == fault_at:
                if spec.fault == "malformed":
                    await _send_event(writer, b"data: {this is not json\n\n")
                    break
                if spec.fault == "nodone":
                    break
                if spec.fault in ("stall", "pause") and await _sleep_or_eof(reader, spec.stall):
                    raise _ClientGone
                if spec.fault != "pause":
                    return  # the caller hangs up: chunked body left unfinished
            if i and spec.delay and await _sleep_or_eof(reader, spec.delay):
                raise _ClientGone
            if reader.at_eof():
                raise _ClientGone
            if spec.stamp and event["choices"] and "content" in event["choices"][0]["delta"]:
                event["choices"][0]["delta"]["content"] = f"@{time.time():.6f} "
            # Logged as it is handed to the transport (the write does not
            # wait), so the log never lacks text a client has read.
            for choice in event["choices"]:
                reply.sent.wrote(choice["delta"])
            await _send_event(writer, b"data: %s\n\n" % json.dumps(event).encode())
        else:
            # Every event, the finish reason among them: the whole answer,
            # with [DONE] or (nodone-finish) without.
            reply.sent.finished = True
        if spec.fault not in ("nodone", "nodone-finish"):
            await _send_event(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        self._count("completed")

    async def _stream_endless(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: _Reply
    ) -> None:
        """Raise _ClientGone or ConnectionError when the client leaves, which
        is the only way this stream ends short of ENDLESS_LIMIT chunks."""
        model = reply.spec.served or reply.model
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for i in range(1, ENDLESS_LIMIT + 1):
            if i > 1 and reply.spec.delay and await _sleep_or_eof(reader, reply.spec.delay):
                raise _ClientGone
            if reader.at_eof():
                raise _ClientGone
            event = _chunk(model, {"content": f"w{i} "})
            reply.sent.wrote(event["choices"][0]["delta"])
            await _send_event(writer, b"data: %s\n\n" % json.dumps(event).encode())
        raise _ClientGone  # past the limit: hang up like a crashed server


async def _read_request(
    reader: asyncio.StreamReader,
) -> tuple[str, str, bytes, dict[str, str]] | None:
    try:
        line = await asyncio.wait_for(reader.readline(), _IDLE_TIMEOUT)
    except TimeoutError:
        return None
    if not line.strip():
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    for _ in range(200):
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        key, _, value = header.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return method, path, body, headers


async def _send(
    writer: asyncio.StreamWriter,
    status: int,
    body: dict | bytes,
    ctype: str = "",
    headers: dict[str, str] | None = None,
) -> bool:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    ctype = ctype or "application/json"
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: {ctype}\r\n"
    head += "".join(f"{key}: {value}\r\n" for key, value in (headers or {}).items())
    head += f"Content-Length: {len(data)}\r\n\r\n"
    writer.write(head.encode() + data)
    await writer.drain()
    return True


async def _send_event(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()


async def _sleep_or_eof(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Sleep, but wake early and return True if the client hangs up meanwhile."""
    # Clients send nothing while a response is pending, so reading only ever sees EOF.
    try:
        return await asyncio.wait_for(reader.read(1), seconds) == b""
    except TimeoutError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8911)
    parser.add_argument(
        "--sent-limit", type=int, default=SENT_LIMIT, help="requests the sent log keeps"
    )
    args = parser.parse_args()
    fake = FakeLLM(args.host, args.port, sent_limit=args.sent_limit).start()
    print(f"listening {fake.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
