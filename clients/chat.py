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
from dataclasses import dataclass
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
    "/help": "list these commands",
    "/exit": "leave (so does Ctrl-D)",
}
HINT = "[type a message and press Enter to send it; /help lists the commands]"
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
    """One prompt and its reply, followed across reconnects."""

    frame: dict[str, Any]  # the `send` frame
    future: asyncio.Future[Outcome]
    sent: bool = False
    user_id: str | None = None  # our user message, once the server has saved it
    after_user: bool = False  # the next assistant message seen is our reply
    reply_id: str | None = None
    stop_wanted: bool = False


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
        if not self.ready.done():
            self.ready.set_result(None)
        turn = self.turn
        if turn is not None and not turn.sent:
            turn.sent = await self._send(turn.frame)
        elif self.conversation is not None:
            # Back after a drop: the replay brings what we missed.
            await self._resubscribe()
            if turn is not None and turn.stop_wanted and turn.reply_id:
                await self._send_stop()

    def _dropped(self) -> None:
        turn = self.turn
        if turn is not None and turn.sent and turn.user_id is None:
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
        if self.fatal is not None:
            return Outcome("error", "disconnected", str(self.fatal))
        frame = {"type": "send", "id": self._id("send"), "conversation": self.conversation}
        frame["content"] = content
        if self.model:
            frame["model"] = self.model
        if self.system is not None:
            frame["system"] = self.system
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
                    if quiet >= QUIET and turn.user_id is not None and self.ws is not None:
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

    # Frames from the server.

    async def _handle(self, frame: dict[str, Any]) -> None:
        kind, turn = frame.get("type"), self.turn
        if kind == "error":
            return self._on_error(frame)
        if turn is None:
            return  # live events of a conversation we are not waiting on
        if kind == "conversation" and frame.get("id") == turn.frame["id"]:
            self.conversation = str(frame["conversation"]["id"])
            note(f"[conversation {self.conversation}]")
            return
        if frame.get("conversation") != self.conversation:
            return
        if kind == "message":
            message = frame.get("message") or {}
            if message.get("role") == "user":
                if frame.get("id") == turn.frame["id"] or message.get("id") == turn.user_id:
                    turn.user_id, turn.after_user = str(message["id"]), True
            elif message.get("role") == "assistant":
                if turn.reply_id is None and turn.after_user:
                    await self._adopt(str(message["id"]))
                if message.get("id") == turn.reply_id:
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

    def _on_error(self, frame: dict[str, Any]) -> None:
        request = str(frame.get("id") or "")
        turn = self.turn
        code, message = str(frame.get("code", "")), str(frame.get("message", ""))
        if turn is not None and (request == turn.frame["id"] or request.startswith("sub-")):
            self._finish(Outcome("error", code, message))
        elif request.startswith("stop-") or not request.startswith("send-"):
            note(f"[server: {code}: {message}]")
        # Else it repeats, for the sender, an error its `end` already showed.

    async def _adopt(self, reply_id: str) -> None:
        turn = self.turn
        assert turn is not None
        turn.reply_id = reply_id
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

    def _finish(self, outcome: Outcome) -> None:
        turn = self.turn
        if turn is None or turn.future.done():
            return
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
    """Send a prompt and wait for the reply; Ctrl-C asks the server to stop
    it, and a second Ctrl-C stops waiting."""
    future = runner.submit(session.ask(content))
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
            if line == "/exit":
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
    elif command == "/help":
        width = max(map(len, COMMANDS))
        for usage, meaning in COMMANDS.items():
            print(f"{usage:<{width}}  {meaning}", flush=True)
    elif command.startswith("/"):
        note(f"[unknown command {command}; /help lists the commands]")
    else:
        report(ask(runner, session, line))


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
