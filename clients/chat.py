#!/usr/bin/env python3
"""A terminal client for chatsite's WebSocket protocol v1 (docs/protocol.md).

    .venv/bin/python clients/chat.py --url ws://HOST/ws/chat/ --token TOKEN "a prompt"
    CHATSITE_URL=ws://HOST/ws/chat/ CHATSITE_TOKEN=... .venv/bin/python clients/chat.py

With a prompt it prints the answer as it streams and exits 0; 1 if the reply
fails, 2 if the server refuses the token (or revokes it, or the account is
deactivated, while it runs). Without one it reads lines:
prompts, and the COMMANDS below (/help lists them). Needs only `websockets`:
the project's .venv (`make install`) has it; elsewhere, `pip install
websockets` and run it with that Python.

What the model writes may hold control characters, and so escape sequences
that would make the terminal set its clipboard (OSC 52) or title, erase or
move about the screen, hide text or show a false link. Those characters
(C0 but tab and newline, DEL, C1) are removed from the answer and the
reasoning alike, wherever they go, since piped text often ends up on a
terminal too (`less -R`, `cat`); --raw keeps them for programs that want
the text exactly. What else the server sends (errors, model names) is
always cleaned.

The socket lives in an asyncio loop on a background thread. The main thread
keeps the blocking input() and is where Python delivers Ctrl-C, so a Ctrl-C
while it waits for a reply becomes a `stop` frame, and one at the prompt ends
the program, with no signal juggling inside the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import json
import os
import random
import re
import signal
import sys
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

T = TypeVar("T")
FINAL = {"complete", "stopped", "error", "interrupted"}
MAX_RECONNECTS = 10
MAX_BACKOFF = 5.0  # seconds
# A reply whose server process died never sends `end`; after this long with
# no frame we subscribe again, which lets the server notice and say so.
QUIET = 10.0  # seconds
CLOSE_TOKEN_REVOKED = 4001
# For a token socket, the account was deactivated: no reconnect can help.
CLOSE_SIGNED_OUT = 4003
COMMANDS = {
    "/model [NAME]": "list the server's models, or answer with NAME from now on",
    "/new": "start a new conversation, with no system prompt",
    "/system [TEXT]": "set the system prompt; without TEXT, clear it",
    "/edit TEXT": "ask your last question again, worded as TEXT (the old version stays)",
    "/versions [[q] N]": "list the versions of the last question and reply; "
    "N shows version N of the reply, q N version N of the question",
    "/help": "list these commands",
    "/exit": "leave (so do /quit and Ctrl-D)",
}
HINT = "[type a message and press Enter to send it; /help lists the commands]"
EDIT_USAGE = "[/edit TEXT asks your last question again, worded as TEXT]"
VERSIONS_USAGE = (
    "[/versions lists the versions; /versions N shows version N of the last reply, "
    "/versions q N version N of the last question]"
)
PREVIEW = 60  # characters of a version shown by /versions
DIM, RESET = "\x1b[2m", "\x1b[0m"
# Without ESC and its one-character C1 forms (CSI is U+009B, OSC U+009D) no
# escape sequence can begin, however the text is split across deltas; what
# is left of one shows as plain text.
UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@dataclass
class Outcome:
    status: str  # an `end` status, or "error" when the server refused the send
    code: str = ""
    message: str = ""

    @classmethod
    def of(cls, status: str, error: dict[str, Any] | None) -> Outcome:
        error = error or {}
        return cls(status, str(error.get("code", "")), str(error.get("message", "")))


class Fatal(Exception):
    """The session cannot go on; the program exits with exit_code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Turn:
    """One prompt and its reply, followed across reconnects: a `send`, an
    `edit` (a new version of a question, and its reply) or a `switch` (to
    another version, whose reply is shown)."""

    frame: dict[str, Any]  # the `send`, `edit` or `switch` frame
    future: asyncio.Future[Outcome]
    sent: bool = False
    user_id: str | None = None  # our user message, once the server has saved it
    after_user: bool = False  # the next assistant message seen is our reply
    reply_id: str | None = None
    stop_wanted: bool = False
    # An edit's or a switch's: the last message of the path it answered
    # with, and whether its frame has been seen (and the reply adopted).
    leaf: str | None = None
    placed: bool = False

    @property
    def kind(self) -> str:
        return str(self.frame["type"])

    @property
    def acknowledged(self) -> bool:
        return self.user_id is not None or self.leaf is not None


@dataclass
class Seen:
    """A message of the conversation as the client last saw it."""

    role: str
    parent: str | None = None
    siblings: list[str] = field(default_factory=list)  # its versions, oldest first
    content: str = ""
    status: str = ""
    seq: int = 0


@dataclass(frozen=True)
class Versions:
    """The versions of one message of the path, oldest first."""

    ids: tuple[str, ...]
    active: int  # the index of the one on the path
    previews: tuple[str, ...]


class PathView:
    """What the client knows of its conversation's tree (issue 13): the
    active path, ids root first, and every message seen in this session,
    those off the path too, for /versions. Kept from the conversation's
    frames: a `conversation` frame with `path` replaces the path; each
    `message` and `start` hangs its message under its parent, cutting what
    was below that, and one marked superseded leaves the path with what
    hangs under it."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.path: list[str] = []
        self.seen: dict[str, Seen] = {}

    def see(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "conversation" and isinstance(frame.get("path"), list):
            self.path = [str(m) for m in frame["path"]]
        elif kind == "message" and isinstance(frame.get("message"), dict):
            message = frame["message"]
            message_id = str(message.get("id"))
            seen = self.seen.setdefault(message_id, Seen(str(message.get("role") or "")))
            seen.parent = _id_or_none(message.get("parent"))
            seen.siblings = [str(m) for m in message.get("siblings") or [message_id]]
            seen.content = str(message.get("content") or "")
            seen.status = str(message.get("status") or "")
            seen.seq = int(message.get("seq") or 0)
            has_parent = "parent" in message
            self._place(message_id, seen.parent, has_parent, bool(message.get("superseded")))
        elif kind == "start":
            reply = str(frame.get("message"))
            seen = self.seen.setdefault(reply, Seen("assistant"))
            seen.parent = _id_or_none(frame.get("parent"))
            seen.siblings = [str(m) for m in frame.get("siblings") or [reply]]
            seen.status = "streaming"
            self._place(reply, seen.parent, "parent" in frame, False)
        elif kind == "delta" and (growing := self.seen.get(str(frame.get("message")))):
            seq = int(frame.get("seq") or 0)
            if seq == growing.seq + 1:  # else a snapshot will bring the text
                growing.content += str(frame.get("content") or "")
                growing.seq = seq
        elif kind == "end" and (ended := self.seen.get(str(frame.get("message")))):
            ended.status = str(frame.get("status") or "")

    def _place(self, message_id: str, parent: str | None, has_parent: bool, off: bool) -> None:
        path = self.path
        if off:
            if message_id in path:
                del path[path.index(message_id) :]
        elif message_id in path:
            pass  # a snapshot of what we show
        elif parent is None and has_parent:
            self.path = [message_id]
        elif parent in path:
            self.path = [*path[: path.index(parent) + 1], message_id]
        else:  # a server before trees, or a parent never seen: it follows
            path.append(message_id)

    def last(self) -> tuple[str | None, str | None]:
        """The last question of the path and the reply to it, if any."""
        roles = [(m, self.seen[m].role if m in self.seen else "") for m in self.path]
        asked = [i for i, (_, role) in enumerate(roles) if role == "user"]
        if not asked:
            return None, None
        question = roles[asked[-1]][0]
        after = roles[asked[-1] + 1 :]
        return question, after[0][0] if after and after[0][1] == "assistant" else None

    def versions(self, message_id: str | None) -> Versions | None:
        if message_id is None:
            return None
        ids = tuple(self.seen[message_id].siblings or [message_id])
        if message_id not in ids:
            ids = (*ids, message_id)
        previews = tuple(preview(self.seen.get(m)) for m in ids)
        return Versions(ids, ids.index(message_id), previews)


def _id_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def preview(seen: Seen | None) -> str:
    """A version's text on one short line, for /versions."""
    if seen is None:
        # Only the path comes to a client: a version elsewhere is known
        # by its id until a switch (or a send) shows it.
        return "(not seen in this session)"
    text = " ".join(printable(seen.content).split())
    if not text:
        return f"({seen.status or 'empty'})"
    return text if len(text) <= PREVIEW else text[: PREVIEW - 1].rstrip() + "…"


def position(question: Versions | None, reply: Versions | None) -> str:
    """Where the path is, as a note: "[question: version 2 of 3; ...]"."""
    parts = [
        f"{name}: version {v.active + 1} of {len(v.ids)}"
        for name, v in (("question", question), ("reply", reply))
        if v is not None
    ]
    return "[" + "; ".join(parts) + "]"


def printable(text: str) -> str:
    return UNPRINTABLE.sub("", text)


def note(text: str) -> None:
    print(printable(text), file=sys.stderr, flush=True)


class Output:
    """The answer goes to stdout; reasoning is dimmed there on a terminal,
    and goes to stderr otherwise, so that a piped stdout holds only the answer."""

    def __init__(self, show_reasoning: bool, raw: bool = False):
        self.show_reasoning = show_reasoning
        self.clean = (lambda text: text) if raw else printable
        self.tty = sys.stdout.isatty()
        self.begin()

    def begin(self) -> None:
        self.reasoning_open = self.wrote_answer = False

    def reasoning(self, text: str) -> None:
        text = self.clean(text)
        if text and self.show_reasoning:
            if self.tty:
                self._write(sys.stdout, DIM + text + RESET)
            else:
                self._write(sys.stderr, text)
            self.reasoning_open = True

    def answer(self, text: str) -> None:
        text = self.clean(text)
        if text:
            self._close_reasoning()
            self._write(sys.stdout, text)
            self.wrote_answer = True

    def end(self, status: str) -> None:
        self._close_reasoning()
        if self.wrote_answer or status == "complete":
            self._write(sys.stdout, "\n")

    def _close_reasoning(self) -> None:
        if self.reasoning_open:
            self._write(sys.stdout if self.tty else sys.stderr, "\n")
            self.reasoning_open = False

    @staticmethod
    def _write(stream: TextIO, text: str) -> None:
        try:
            stream.write(text)
            stream.flush()  # each delta shows as it arrives
        except BrokenPipeError:  # `chat.py ... | head`: nobody reads any more
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
            raise Fatal("output closed") from None


class Continuations:
    """A `message` frame with `continues: true` and the `more` frames after
    it, put back together (docs/protocol.md, "Big messages"): the server cuts
    a message over its 1 MiB frame limit into pieces. One per connection:
    the pieces of a message cut off by a drop never end."""

    def __init__(self) -> None:
        # message id -> (its message frame, content pieces, reasoning pieces)
        self.open: dict[str, tuple[dict[str, Any], list[str], list[str]]] = {}

    def take(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        """The frame to handle now: frame itself, a whole message, or None
        while pieces are due."""
        message = frame.get("message")
        if frame.get("type") == "message" and frame.get("continues") is True:
            if isinstance(message, dict) and isinstance(message.get("id"), str):
                content, reasoning = message.get("content") or "", message.get("reasoning") or ""
                self.open[message["id"]] = (frame, [content], [reasoning])
            return None
        if frame.get("type") != "more":
            return frame
        if not isinstance(message, str) or message not in self.open:
            return None  # its message frame came on an earlier connection
        first, content, reasoning = self.open[message]
        content.append(str(frame.get("content") or ""))
        reasoning.append(str(frame.get("reasoning") or ""))
        if frame.get("continues") is not False:
            return None
        del self.open[message]
        text = {"content": "".join(content), "reasoning": "".join(reasoning)}
        whole = {**first, "message": {**first["message"], **text}}
        del whole["continues"]
        return whole


class Session:
    """One logical chat session over a socket that may be replaced: every
    method runs on the event loop thread."""

    def __init__(
        self,
        url: str,
        token: str,
        output: Output,
        *,
        model: str | None,
        conversation: str | None,
        system: str | None,
    ):
        self.url, self.token, self.output = url, token, output
        self.model, self.conversation, self.system = model, conversation, system
        self.models: list[str] = []
        self.default_model = ""
        self.ws: ClientConnection | None = None  # None while (re)connecting
        self.turn: Turn | None = None
        # Per reply: the seq we hold and how much text is on screen, so a
        # snapshot after a reconnect prints only what is new.
        self.held: dict[str, int] = {}
        self.printed: dict[str, list[int]] = {}  # id -> [answer chars, reasoning chars]
        self.resyncing = False
        self.failures = 0
        self.fatal: Fatal | None = None
        self.closing = False
        self.interrupt_main = False  # set by the REPL, see _die
        self.last_heard = 0.0
        self.task: asyncio.Task[None] | None = None
        self.ids = itertools.count(1)
        self.view = PathView()
        self.sync_ping: str | None = None

    def _id(self, kind: str) -> str:
        return f"{kind}-{next(self.ids)}"

    # Connection.

    async def open(self) -> None:
        """Connect; raise Fatal if the first connection fails."""
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(self._run())
        await self.ready

    async def close(self) -> None:
        self.closing = True
        if self.ws is not None:
            await self.ws.close()
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        while True:
            error = "closed by the server"
            try:
                await self._connect_and_read()
            except InvalidStatus as exc:
                code = exc.response.status_code
                if code in (401, 403):
                    return self._die(Fatal(f"the server refused the token (HTTP {code})", 2))
                error = f"HTTP {code}"
            except Fatal as exc:
                return self._die(exc)
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI, ConnectionClosed) as exc:
                error = str(exc) or type(exc).__name__
            except Exception as exc:  # a frame we did not expect: fail loudly, never hang
                return self._die(Fatal(f"internal error: {exc!r}"))
            self.ws = None
            if self.closing:
                return
            if not self.ready.done():  # nothing to resume yet: say so at once
                return self._die(Fatal(f"cannot connect to {self.url}: {error}"))
            self._dropped()
            self.failures += 1
            if self.failures > MAX_RECONNECTS:
                return self._die(Fatal(f"connection lost ({error}); gave up reconnecting"))
            delay = min(MAX_BACKOFF, 0.25 * 2 ** (self.failures - 1)) * random.uniform(0.8, 1.0)
            note(f"[connection lost ({error}); reconnecting in {delay:.1f} s]")
            await asyncio.sleep(delay)

    async def _connect_and_read(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with websockets.connect(
            self.url, additional_headers=headers, open_timeout=10, max_size=2**24
        ) as ws:
            ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if ready.get("type") != "ready" or ready.get("protocol") != 1:
                raise Fatal(f"unexpected first frame from the server: {ready!r:.200}")
            await self._on_ready(ws, ready)
            pieces = Continuations()
            try:
                async for raw in ws:
                    self.last_heard = asyncio.get_running_loop().time()
                    try:
                        frame = json.loads(raw)
                    except ValueError:
                        continue
                    whole = pieces.take(frame) if isinstance(frame, dict) else None
                    if whole is not None:
                        await self._handle(whole)
            except ConnectionClosed:
                pass
        if ws.close_code == CLOSE_TOKEN_REVOKED:
            raise Fatal("the token was revoked", 2)
        if ws.close_code == CLOSE_SIGNED_OUT:
            raise Fatal("signed out by the server: the account was deactivated", 2)
        if ws.close_code not in (None, 1000, 1001):
            raise ConnectionError(f"closed with code {ws.close_code}")

    async def _on_ready(self, ws: ClientConnection, ready: dict[str, Any]) -> None:
        self.ws = ws
        self.failures = 0
        self.models = [str(m) for m in ready.get("models") or []]
        self.default_model = str(ready.get("default_model") or "")
        first = not self.ready.done()
        turn = self.turn
        if turn is not None and not turn.sent:
            turn.sent = await self._send(turn.frame)
        elif self.conversation is not None:
            # Back after a drop, the replay brings what we missed; at the
            # start (--conversation), the path /edit and /versions work on.
            await self._resubscribe()
            if first:
                # Frames are answered in order: the pong comes after the
                # whole replay, and open() returns then.
                self.sync_ping = self._id("ping")
                await self._send({"type": "ping", "id": self.sync_ping})
                return
            if turn is not None and turn.stop_wanted and turn.reply_id:
                await self._send_stop()
        if first:
            self.ready.set_result(None)

    def _dropped(self) -> None:
        turn = self.turn
        if turn is not None and turn.sent and not turn.acknowledged:
            # We cannot tell whether the server took the message; sending it
            # again might post it twice, so give up on this one.
            message = "connection lost before the server acknowledged the message"
            self._finish(Outcome("error", "disconnected", message))
        self.resyncing = False

    def _die(self, fatal: Fatal) -> None:
        self.fatal = fatal
        if self.turn is None:  # else the turn's outcome reports it
            note(f"chat: {fatal}")
        if not self.ready.done():
            self.ready.set_exception(fatal)
        if self.turn is None and self.interrupt_main:
            # The REPL sits in input() on the main thread: a signal there is
            # the one way to end it now rather than after the next line.
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        self._finish(Outcome("error", "disconnected", str(fatal)))

    async def _send(self, frame: dict[str, Any]) -> bool:
        if self.ws is None:
            return False
        try:
            await self.ws.send(json.dumps(frame))
        except ConnectionClosed:
            return False
        return True

    async def _resubscribe(self) -> None:
        turn = self.turn
        if turn is not None and turn.reply_id is None:
            turn.after_user = False  # the replay will pass our message again
        # Deltas until the snapshot arrives are covered by it: skip them.
        self.resyncing = turn is not None and turn.reply_id is not None
        frame = {"type": "subscribe", "conversation": self.conversation, "id": self._id("sub")}
        await self._send(frame)

    async def _send_stop(self) -> None:
        await self._send(
            {"type": "stop", "conversation": self.conversation, "id": self._id("stop")}
        )

    # Requests from the main thread.

    async def ask(self, content: str) -> Outcome:
        frame = {"type": "send", "id": self._id("send"), "conversation": self.conversation}
        frame["content"] = content
        if self.model:
            frame["model"] = self.model
        if self.system is not None:
            frame["system"] = self.system
        return await self._take_turn(frame)

    async def edit(self, message_id: str, content: str) -> Outcome:
        """Ask a question of the path again, worded as content: the server
        answers with the new path, then streams the new reply."""
        frame = {"type": "edit", "id": self._id("edit"), "conversation": self.conversation}
        frame.update(message=message_id, content=content)
        if self.model:
            frame["model"] = self.model
        return await self._take_turn(frame)

    async def switch(self, message_id: str) -> Outcome:
        """Show another version of a message: the server answers with the
        path to the newest leaf under it, whose reply is printed."""
        frame = {"type": "switch", "id": self._id("switch"), "conversation": self.conversation}
        frame["message"] = message_id
        return await self._take_turn(frame)

    async def last_versions(self) -> tuple[Versions | None, Versions | None]:
        """The versions of the path's last question and of its reply."""
        question, reply = self.view.last()
        return self.view.versions(question), self.view.versions(reply)

    async def _take_turn(self, frame: dict[str, Any]) -> Outcome:
        if self.fatal is not None:
            return Outcome("error", "disconnected", str(self.fatal))
        turn = self.turn = Turn(frame, asyncio.get_running_loop().create_future())
        self.output.begin()
        try:
            if self.ws is not None:  # else _on_ready sends it after the reconnect
                turn.sent = True
                turn.sent = await self._send(frame)
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(turn.future), QUIET)
                except TimeoutError:
                    quiet = asyncio.get_running_loop().time() - self.last_heard
                    if quiet >= QUIET and turn.acknowledged and self.ws is not None:
                        await self._resubscribe()
        finally:
            if self.turn is turn:
                self.turn = None

    async def stop(self) -> None:
        turn = self.turn
        if turn is None:
            return
        turn.stop_wanted = True
        # A stop before `start` could reach the server before the reply listens
        # for it; so it waits for the reply to be known (see _adopt).
        if turn.reply_id is not None:
            await self._send_stop()

    async def new_conversation(self) -> None:
        if self.conversation is not None:
            await self._send({"type": "unsubscribe", "conversation": self.conversation})
        # A prompt written for one conversation is not silently carried into
        # the next: /system sets one for it.
        self.conversation = self.system = None
        self.view.clear()

    # Frames from the server.

    async def _handle(self, frame: dict[str, Any]) -> None:
        kind, turn = frame.get("type"), self.turn
        request = frame.get("id")
        if kind == "error":
            return self._on_error(frame)
        if kind == "pong":
            if request == self.sync_ping and not self.ready.done():
                self.ready.set_result(None)
            return
        new = turn is not None and turn.kind == "send" and request == turn.frame["id"]
        if kind == "conversation" and new:
            self.conversation = str(frame["conversation"]["id"])
            note(f"[conversation {self.conversation}]")
        if self._about_ours(frame):
            # Even when we wait on nothing: another tab's edit or switch
            # moves the path /edit and /versions work on.
            full_replay = str(request or "").startswith("sub-") and frame.get("replay") != "live"
            if kind == "conversation" and full_replay and "path" not in frame:
                self.view.path = []  # the path follows, message by message
            self.view.see(frame)
        if turn is None:
            return  # live events of a conversation we are not waiting on
        if kind == "conversation":
            if request == turn.frame["id"] and turn.kind != "send" and frame.get("path"):
                turn.leaf = str(frame["path"][-1])
            return
        if frame.get("conversation") != self.conversation:
            return
        if kind == "message":
            message = frame.get("message") or {}
            message_id = str(message.get("id"))
            if message_id == turn.leaf and not turn.placed:
                # The end of the path an edit or a switch answered with,
                # every message before it seen: say where it is, and follow
                # its reply (a switch shows it whole, if shown before too).
                turn.placed = True
                note(position(*await self.last_versions()))
                if message.get("role") != "assistant":
                    return self._finish(Outcome("complete"), shown=False)
                await self._adopt(message_id, again=turn.kind == "switch")
            if message.get("role") == "user" and turn.kind == "send":
                if request == turn.frame["id"] or message_id == turn.user_id:
                    turn.user_id, turn.after_user = message_id, True
            elif message.get("role") == "assistant":
                if turn.reply_id is None and turn.after_user:
                    await self._adopt(message_id)
                if message_id == turn.reply_id:
                    self._snapshot(message)
        elif kind == "start" and turn.reply_id is None and turn.after_user:
            await self._adopt(str(frame["message"]))
        elif kind == "delta" and frame.get("message") == turn.reply_id and not self.resyncing:
            held, seq = self.held[turn.reply_id], int(frame.get("seq") or 0)
            if seq > held + 1:
                await self._resubscribe()  # a delta went missing: fetch the text anew
            elif seq == held + 1:
                self.held[turn.reply_id] = seq
                self._print(turn.reply_id, frame.get("content", ""), frame.get("reasoning", ""))
        elif kind == "end" and frame.get("message") == turn.reply_id:
            if self.resyncing:
                return  # the snapshot on its way carries the final status
            if int(frame.get("seq") or 0) > self.held[turn.reply_id]:
                return await self._resubscribe()  # the last deltas went missing
            self._finish(Outcome.of(frame.get("status", "error"), frame.get("error")))

    def _about_ours(self, frame: dict[str, Any]) -> bool:
        about = frame.get("conversation")
        if isinstance(about, dict):  # a `conversation` frame
            about = about.get("id")
        return self.conversation is not None and about == self.conversation

    def _on_error(self, frame: dict[str, Any]) -> None:
        request = str(frame.get("id") or "")
        turn = self.turn
        code, message = str(frame.get("code", "")), str(frame.get("message", ""))
        if turn is not None and (request == turn.frame["id"] or request.startswith("sub-")):
            self._finish(Outcome("error", code, message))
        elif request.startswith("sub-") and not self.ready.done():
            # --conversation names one we cannot open: nothing to go on with.
            self._die(Fatal(f"{code}: {message}"))
        elif request.startswith("stop-") or not request.startswith(("send-", "edit-")):
            note(f"[server: {code}: {message}]")
        # Else it repeats, for the sender, an error its `end` already showed.

    async def _adopt(self, reply_id: str, again: bool = False) -> None:
        """Follow reply_id as the turn's reply; again: print all of it, if
        printed before too (a switch back to it)."""
        turn = self.turn
        assert turn is not None
        turn.reply_id = reply_id
        if again:
            self.held[reply_id], self.printed[reply_id] = 0, [0, 0]
        self.held.setdefault(reply_id, 0)
        self.printed.setdefault(reply_id, [0, 0])
        if turn.stop_wanted:
            await self._send_stop()

    def _snapshot(self, message: dict[str, Any]) -> None:
        reply_id = str(message["id"])
        done = self.printed[reply_id]
        self.output.reasoning((message.get("reasoning") or "")[done[1] :])
        self.output.answer((message.get("content") or "")[done[0] :])
        done[0] = max(done[0], len(message.get("content") or ""))
        done[1] = max(done[1], len(message.get("reasoning") or ""))
        self.held[reply_id] = max(self.held[reply_id], int(message.get("seq") or 0))
        self.resyncing = False
        if message.get("status") in FINAL:
            self._finish(Outcome.of(message["status"], message.get("error")))

    def _print(self, reply_id: str, content: str, reasoning: str) -> None:
        self.output.reasoning(reasoning)
        self.output.answer(content)
        self.printed[reply_id][0] += len(content)
        self.printed[reply_id][1] += len(reasoning)

    def _finish(self, outcome: Outcome, shown: bool = True) -> None:
        """End the turn; shown: a reply was being printed, to end its line."""
        turn = self.turn
        if turn is None or turn.future.done():
            return
        if shown:
            self.output.end(outcome.status)
        turn.future.set_result(outcome)
        self.turn = None


class LoopThread:
    """An event loop on a daemon thread, driven from the main thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="chat-loop", daemon=True).start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self.submit(coro).result(timeout)


def ask(runner: LoopThread, session: Session, content: str) -> Outcome:
    return follow(runner, session, session.ask(content))


def follow(runner: LoopThread, session: Session, turn: Coroutine[Any, Any, Outcome]) -> Outcome:
    """Run a turn (a send, an edit, a switch) and wait for its reply; Ctrl-C
    asks the server to stop it, and a second Ctrl-C stops waiting."""
    future = runner.submit(turn)
    stopping = False
    while True:
        try:
            return future.result()
        except KeyboardInterrupt:
            if stopping:
                future.cancel()
                session.output.end("stopped")
                return Outcome("stopped", "", "gave up waiting for the reply to stop")
            stopping = True
            runner.submit(session.stop())


def report(outcome: Outcome) -> int:
    """Say how a reply ended; return the exit status it means."""
    if outcome.status == "complete":
        return 0
    if outcome.status == "stopped":
        note(f"[stopped{': ' + outcome.message if outcome.message else ''}]")
        return 130
    note(f"chat: {outcome.code or outcome.status}: {outcome.message or 'the reply failed'}")
    return 1


def repl(runner: LoopThread, session: Session) -> int:
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    session.interrupt_main = True
    if interactive:
        note(HINT)
    try:
        while session.fatal is None:
            try:
                line = input("> " if interactive else "").strip()
            except EOFError:
                return 0
            if line in ("/exit", "/quit"):
                return 0
            if line:
                run_line(runner, session, line)
        return session.fatal.exit_code
    except KeyboardInterrupt:  # not during a reply: from the user, or from _die
        print(file=sys.stderr)
        return session.fatal.exit_code if session.fatal else 0


def run_line(runner: LoopThread, session: Session, line: str) -> None:
    """A REPL command, or a prompt to send."""
    command, _, rest = line.partition(" ")
    rest = rest.strip()
    if command == "/new":
        had_system = bool(session.system)
        runner.run(session.new_conversation())
        note("[new conversation, system prompt cleared]" if had_system else "[new conversation]")
    elif command == "/model" and rest:
        session.model = rest
        note(f"[model {rest}]")
    elif command == "/model":
        current = session.model or session.default_model
        for model in session.models:
            print(("* " if model == current else "  ") + printable(model), flush=True)
        if not session.models:
            note("[the server lists no models]")
    elif command == "/system":
        session.system = rest  # empty clears it
        note("[system prompt set]" if rest else "[system prompt cleared]")
    elif command == "/edit":
        edit(runner, session, rest)
    elif command == "/versions":
        versions(runner, session, rest)
    elif command == "/help":
        width = max(map(len, COMMANDS))
        for usage, meaning in COMMANDS.items():
            print(f"{usage:<{width}}  {meaning}", flush=True)
    elif command.startswith("/"):
        note(f"[unknown command {command}; /help lists the commands]")
    else:
        report(ask(runner, session, line))


def edit(runner: LoopThread, session: Session, text: str) -> None:
    """/edit TEXT: a new version of the path's last question, and its reply."""
    if not text:
        note(EDIT_USAGE)
        return
    question, _ = runner.run(session.last_versions())
    if question is None:
        note("[nothing to edit yet: ask a question first]")
        return
    report(follow(runner, session, session.edit(question.ids[question.active], text)))


def versions(runner: LoopThread, session: Session, args: str) -> None:
    """/versions: list the versions of the last question and reply, the one
    shown marked; /versions N, /versions q N: show another."""
    question, reply = runner.run(session.last_versions())
    words = args.split()
    if not words:
        if question is None and reply is None:
            note("[no versions yet: ask a question first]")
            return
        for name, known in (("last question", question), ("last reply", reply)):
            if known is not None:
                print(f"{name}:", flush=True)
                for i, text in enumerate(known.previews):
                    mark = "* " if i == known.active else "  "
                    print(f"{mark}version {i + 1} of {len(known.ids)}: {text}", flush=True)
        if any(known is not None and len(known.ids) > 1 for known in (question, reply)):
            note(VERSIONS_USAGE)
        return
    if len(words) == 1 and re.fullmatch("[0-9]+", words[0]):
        name, known, number = "reply", reply, int(words[0])
    elif len(words) == 2 and words[0] == "q" and re.fullmatch("[0-9]+", words[1]):
        name, known, number = "question", question, int(words[1])
    else:
        note(VERSIONS_USAGE)
        return
    if known is None:
        note(f"[there is no {name} yet to pick a version of]")
    elif len(known.ids) == 1 and number != 1:
        note(f"[the last {name} has only 1 version]")
    elif not 1 <= number <= len(known.ids):
        note(f"[the last {name} has {len(known.ids)} versions: pick 1 to {len(known.ids)}]")
    else:
        report(follow(runner, session, session.switch(known.ids[number - 1])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Chat with a chatsite server.",
        epilog="Without a prompt, a REPL: " + ", ".join(COMMANDS),
    )
    parser.add_argument("prompt", nargs="?", help="ask this and exit (else a REPL)")
    parser.add_argument(
        "--url",
        default=os.environ.get("CHATSITE_URL"),
        help="ws://HOST/ws/chat/ (default: $CHATSITE_URL)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("CHATSITE_TOKEN"),
        help="API token (default: $CHATSITE_TOKEN, which ps does not show)",
    )
    parser.add_argument("--model", help="model to answer with (default: the server's)")
    parser.add_argument("--conversation", help="continue this conversation id")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--no-reasoning", action="store_true", help="hide the model's reasoning")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="keep control characters and escape sequences in the model's text",
    )
    args = parser.parse_args(argv)
    if not args.url or not args.token:
        parser.error("--url and --token (or CHATSITE_URL and CHATSITE_TOKEN) are required")
    # Python ignores Ctrl-C if started with SIGINT ignored (as by `nohup` or
    # some runners); we need it as KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    runner = LoopThread()
    session = Session(
        args.url,
        args.token,
        Output(not args.no_reasoning, args.raw),
        model=args.model,
        conversation=args.conversation,
        system=args.system,
    )
    try:
        runner.run(session.open())
        if args.prompt is not None:
            return report(ask(runner, session, args.prompt))
        return repl(runner, session)
    except Fatal as exc:
        return exc.exit_code  # already reported
    except KeyboardInterrupt:
        return session.fatal.exit_code if session.fatal else 130
    finally:
        try:
            runner.run(session.close(), timeout=5)
        except (Exception, KeyboardInterrupt):
            pass  # leaving anyway


if __name__ == "__main__":
    sys.exit(main())
