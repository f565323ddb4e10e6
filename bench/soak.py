"""Soak test (issue 10, item 9): many sockets of many users chat for minutes
against the fake model server, with random stops, regenerates, reloads
(disconnect, reconnect, resubscribe), deletes and slow readers. Then every
stored reply must have a final status and the text the model server wrote
for it up to that point (its sent log), every client's view of every reply
must equal the database, and each server process's memory at the end is
compared with its memory after the first minute. Prints a table of its
figures. Loopback only; every loop is bounded.

    .venv/bin/python bench/soak.py --minutes 1 --sockets 40 --users 8 --processes 1
    DATABASE_URL=postgres://postgres@127.0.0.1/test REDIS_URL=redis://127.0.0.1:6379/0 \\
        .venv/bin/python bench/soak.py          # 10 minutes, 200 sockets, 20 users, 2 processes

Site settings go after the options as NAME=value (CHAT_SEND_BUFFER=4194304).
Exits 1 on a lost or wrong reply or message, never on a time or on memory.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import PASSWORD
from tests.live import Browser, Site, cpu_seconds, fake_llm_process, rss_mb

FINAL = {"complete", "stopped", "error", "interrupted"}
VIEW_KEYS = ("role", "content", "reasoning", "status", "seq")  # what a client keeps of a message
# The reply echoes the prompt, five characters a chunk: each prompt is
# unique, so the model server's log says which request a stored reply is.
MODEL = "fake:echo=raw,delay=0.03"
# What sends ask for, by weight: now and then a model server that breaks
# off (interrupted, or error before any text) or refuses (error).
MODELS = [
    (88, MODEL),
    (5, "fake:echo=raw,delay=0.01"),
    (4, "fake:echo=raw,delay=0.03,fault=cut,after={after}"),
    (3, "fake:echo=raw,fault=500"),
]
WORDS = [
    *("river", "stone", "lamp", "orbit", "cedar", "quartz", "meadow", "signal"),
    *("copper", "harbor", "lantern", "violet", "thunder", "pixel", "garden", "falcon"),
    *("marble", "ember", "canyon", "velvet", "comet", "willow", "prism", "anchor"),
]
# Bounds on waits, so that a hung server fails the run instead of hanging it.
ANSWER_TIMEOUT = 30.0  # a request's answer (its pong)
REPLY_TIMEOUT = 60.0  # a reply's end
DRAIN_TIMEOUT = 120.0  # every reply in the database ending, after the deadline
SAMPLE_EVERY = 5.0  # seconds between memory samples
MAX_WATCHED = 6  # conversations a socket holds before it leaves one
# Each user has a conversation this big, made at the start, that a stalled
# reader asks for: loopback's kernel buffers take about 4 MB of what a
# socket leaves unread before daphne holds any, so nothing smaller could
# ever reach CHAT_SEND_BUFFER. Its messages are each over a frame (1 MiB),
# so they go as `message` and `more` frames.
BIG_MESSAGES, BIG_SIZE = 7, 1_200_000
STALL = 8.0  # seconds a stalled reader reads nothing

# A socket's next action, by weight.
ACTIONS = {
    "send": 46,
    "regenerate": 10,
    "reload": 8,
    "slow": 6,
    "stall": 0.4,
    "watch": 12,
    "delete": 3,
    "idle": 15,
}


def site_settings(args: argparse.Namespace) -> dict[str, str]:
    """The site's limits, set so that they show up without dominating: the
    users here are ten tabs each, busier than any person."""
    return {
        "DEFAULT_MODEL": MODEL,
        "LOG_LEVEL": "WARNING",
        # As a site is run, not as a developer's: DEBUG keeps every query
        # of each database thread (up to 9,000), which a memory check over
        # ten minutes would measure instead of the site.
        "DEBUG": "0",
        "SECRET_KEY": uuid.uuid4().hex,
        "SECURE_COOKIES": "0",  # plain http on loopback
        "CHAT_RATE_LIMIT": "600",
        "CHAT_MAX_REPLIES_PER_USER": "6",
        "CHAT_MAX_REPLIES": "100",
        # A title request is not a reply: the check of the model server's
        # log against the stored replies would count it as lost text.
        "CHAT_SUGGEST_TITLES": "0",
        # Small, so that a socket which stops reading for a few seconds is
        # closed with 4002 and has to come back, as a real slow reader does.
        "CHAT_SEND_BUFFER": "8192",
        "CHAT_SEND_TIMEOUT": "2",
        "REDIS_PREFIX": f"soak-{uuid.uuid4().hex[:12]}",
    }


counts: Counter[str] = Counter()
timings: dict[str, list[float]] = {"ttft_ms": [], "stop_ms": [], "ping_ms": [], "lag_ms": []}


# Set-up.


def fetch_sent(base_url: str) -> list[dict[str, Any]]:
    url = base_url.removesuffix("/v1") + "/fake/sent"
    with urllib.request.urlopen(url, timeout=120) as response:
        return json.load(response)


@contextmanager
def soak_database(workdir: Path, keep: Callable[[], bool]) -> Iterator[str]:
    """A database of the soak's own: a new one on DATABASE_URL's Postgres
    server, else a SQLite file. Dropped afterwards unless keep() says so."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgres"):
        yield f"sqlite:///{workdir / 'soak.sqlite3'}"
        return
    import psycopg

    name = f"soak_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urllib.parse.urlparse(url)._replace(path=f"/{name}").geturl()
    finally:
        if keep():
            print(f"kept the database {name}")
        else:
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def use_database(database_url: str) -> None:
    """Django in this process, on the site's database, for the set-up and
    the final checks (run in threads: the ORM is not for the event loop)."""
    os.environ["DATABASE_URL"] = database_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
    import django

    django.setup()


def make_users(count: int) -> list[tuple[str, str, str]]:
    """count users, each with an API token and a big conversation:
    (username, token, the big conversation's id)."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password
    from django.db import connections

    from conversations.models import ApiToken, Conversation, Message

    hashed = make_password(PASSWORD)  # one slow hash for all of them
    users = []
    for index in range(count):
        user = get_user_model().objects.create(username=f"soak{index:02d}", password=hashed)
        big = Conversation.objects.create(owner=user, title="big")
        roles = itertools.cycle([Message.Role.USER, Message.Role.ASSISTANT])
        Message.objects.bulk_create(
            Message(conversation=big, role=next(roles), content=f"{i} ".ljust(BIG_SIZE, "x"))
            for i in range(BIG_MESSAGES)
        )
        users.append((user.username, ApiToken.issue(user, "soak")[1], str(big.pk)))
    connections.close_all()
    return users


@dataclass
class User:
    name: str
    token: str
    big: str  # its big conversation, which only stalled readers ask for
    browser: Browser
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    conversations: set[str] = field(default_factory=set)

    def delete(self, conversation: str) -> int:
        """Delete a conversation as the page does; the HTTP status."""
        csrf = next(c.value for c in self.browser.cookies if c.name == "csrftoken")
        request = urllib.request.Request(
            f"{self.browser.base_url}/c/{conversation}/delete/",
            data=b"",
            headers={"X-CSRFToken": csrf, "Accept": "application/json"},
        )
        try:
            with self.browser.opener.open(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code


# The clients.


@dataclass
class Shared:
    """What the sockets share: the site, the deadline and the record of
    what the server acknowledged or refused."""

    site: Site
    seed: int
    deadline: float
    think: float
    acked: dict[str, tuple[str, str]] = field(default_factory=dict)  # message -> (conv, text)
    refused: set[str] = field(default_factory=set)  # prompts the server said no to


class Client:
    """One socket of a user, replaced when it drops or reloads, showing
    its conversations by the protocol's client rule (docs/protocol.md,
    "Snapshots, seq, gaps and resuming")."""

    def __init__(self, shared: Shared, index: int, user: User):
        self.shared, self.index, self.user = shared, index, user
        self.rng = random.Random(f"{shared.seed}-{index}")
        self.process = index % len(shared.site.ports)
        self.ids = itertools.count(1)
        self.prompts = itertools.count(1)
        self.ws: ClientConnection | None = None
        self.generation = 0  # connections opened
        self.finished = False
        self.reloading = False
        self.reconnect_pause = 0.0
        # The client's view: conversation -> message id -> what it shows.
        self.view: dict[str, dict[str, dict[str, Any]]] = {}
        self.watched: set[str] = set()  # resubscribed after a reconnect
        self.resyncing: set[str] = set()  # waiting for a subscribe's snapshot
        self.continued: dict[str, tuple[dict, list[str], list[str]]] = {}
        self.subscribes: dict[str, str] = {}  # subscribe request id -> conversation
        self.answers: dict[str, list[dict]] = {}  # request id -> frames that answered it
        self.pongs: dict[str, asyncio.Future[None]] = {}
        self.waiters: list[tuple[str, Callable[[], bool], asyncio.Future[None]]] = []
        self.slow_until = 0.0
        self.pause = 0.0
        self.retries: set[asyncio.Task] = set()
        self.stalling: str | None = None  # the big conversation, while asked for
        self.stalled = asyncio.Event()

    def next_id(self, kind: str) -> str:
        return f"{kind}-{next(self.ids)}"

    # The connection.

    async def open(self) -> ClientConnection:
        port = self.shared.site.ports[self.process]
        sock = socket.socket()
        # A small window: what a stalled reader leaves unread piles up on
        # the server's side (its kernel, then daphne), not in this process.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            ws = await websockets.connect(
                self.shared.site.ws_url(self.process),
                sock=sock,
                additional_headers={"Authorization": f"Bearer {self.user.token}"},
                compression=None,
                proxy=None,
                open_timeout=ANSWER_TIMEOUT,
                ping_interval=None,  # a paused reader must not fail our own pings
                max_queue=1,  # so that not reading soon stops reading the socket
                max_size=2**24,
            )
        except BaseException:
            sock.close()
            raise
        try:
            ready = json.loads(await asyncio.wait_for(ws.recv(), ANSWER_TIMEOUT))
        except BaseException:
            await ws.close()
            raise
        if ready.get("type") != "ready":
            await ws.close()
            raise ConnectionError(f"unexpected first frame {ready!r:.200}")
        return ws

    async def connection(self) -> None:
        """Keep a socket open until the end: reconnect after a drop or a
        reload, and resubscribe what the client shows."""
        failures = 0
        while not self.finished:
            await asyncio.sleep(self.reconnect_pause)
            self.reconnect_pause = 0.0
            try:
                ws = await self.open()
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                failures += 1
                counts["connects failed"] += 1
                counts[f"connects failed ({type(exc).__name__})"] += 1
                # Backs off as the page does (static/chat/socket.js), and
                # keeps trying; jittered, as clients/chat.py is.
                self.reconnect_pause = min(10.0, 0.5 * 2**failures) * self.rng.uniform(0.8, 1)
                continue
            failures = 0
            self.ws, self.generation = ws, self.generation + 1
            self.continued.clear()
            for conversation in sorted(self.watched):
                await self.subscribe(conversation)
            try:
                async for raw in ws:
                    if time.monotonic() < self.slow_until:
                        await asyncio.sleep(self.pause)
                    await self.handle(json.loads(raw))
            except ConnectionClosed:
                pass
            self.ws = None
            if self.reloading:
                self.reloading = False
            elif not self.finished:
                counts[f"dropped ({ws.close_code or 1006})"] += 1
                self.reconnect_pause = 0.2
            for pong in self.pongs.values():
                if not pong.done():
                    pong.set_exception(ConnectionError("the socket closed"))
            self.pongs.clear()

    async def send(self, frame: dict[str, Any]) -> bool:
        ws = self.ws
        if ws is None:
            return False
        try:
            await ws.send(json.dumps(frame))
        except ConnectionClosed:
            return False
        return True

    async def request(self, frame: dict[str, Any]) -> tuple[str | None, list[dict]]:
        """Send a frame, then a ping: the server answers frames in order,
        so once the pong is in, every answer to the frame is too. The
        error code (or "disconnected", "timeout") and the answering frames."""
        request_id = frame.get("id") or self.next_id(frame["type"])
        ping_id = self.next_id("ping")
        pong = asyncio.get_running_loop().create_future()
        self.pongs[ping_id] = pong
        self.answers[request_id] = []
        try:
            sent = await self.send({**frame, "id": request_id})
            if not sent or not await self.send({"type": "ping", "id": ping_id}):
                return "disconnected", []
            try:
                await asyncio.wait_for(pong, ANSWER_TIMEOUT)
            except TimeoutError:
                counts["answers timed out"] += 1
                return "timeout", []
            except ConnectionError:
                return "disconnected", []
        finally:
            self.pongs.pop(ping_id, None)
            answers = self.answers.pop(request_id, [])
        errors = [a for a in answers if a["type"] == "error"]
        return (errors[0]["code"] if errors else None), answers

    async def subscribe(self, conversation: str) -> None:
        request_id = self.next_id("sub")
        self.subscribes[request_id] = conversation
        self.watched.add(conversation)
        self.resyncing.add(conversation)
        await self.send({"type": "subscribe", "conversation": conversation, "id": request_id})

    def forget(self, conversation: str) -> None:
        self.view.pop(conversation, None)
        self.watched.discard(conversation)
        self.resyncing.discard(conversation)

    # Frames from the server.

    async def handle(self, frame: dict[str, Any]) -> None:
        counts["frames received"] += 1
        whole = self.join_pieces(frame)
        if whole is None:
            return
        frame = whole
        kind = frame.get("type")
        request_id = frame.get("id")
        if request_id in self.answers:
            self.answers[request_id].append(frame)
        stall = self.stall_answer() if kind == "conversation" else None
        handler = getattr(self, f"on_{kind}", None)
        if handler is not None:
            await handler(frame)
        if stall is not None and request_id == stall:
            # The big replay comes right behind: read none of it for a while.
            await asyncio.sleep(STALL)
            self.stalled.set()
        conversation = frame.get("conversation")
        if isinstance(conversation, dict):
            conversation = conversation.get("id")
        for waiter in [w for w in self.waiters if w[0] == conversation]:
            if waiter[1]() and not waiter[2].done():
                waiter[2].set_result(None)

    def join_pieces(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        """A big snapshot's `message` frame and its `more` frames, as one."""
        if frame.get("type") == "message" and frame.get("continues") is True:
            message = frame["message"]
            self.continued[message["id"]] = (frame, [message["content"]], [message["reasoning"]])
            counts["big snapshots"] += 1
            return None
        if frame.get("type") != "more":
            return frame
        if frame["message"] not in self.continued:
            return None
        first, content, reasoning = self.continued[frame["message"]]
        content.append(frame.get("content", ""))
        reasoning.append(frame.get("reasoning", ""))
        if frame.get("continues"):
            return None
        del self.continued[frame["message"]]
        text = {"content": "".join(content), "reasoning": "".join(reasoning)}
        return {**first, "message": {**first["message"], **text}, "continues": False}

    def stall_answer(self) -> str | None:
        """The id of the stalled reader's subscribe, while it waits."""
        if self.stalling is None or self.stalled.is_set():
            return None
        return next((i for i, c in self.subscribes.items() if c == self.stalling), None)

    async def on_conversation(self, frame: dict[str, Any]) -> None:
        conversation = frame["conversation"]["id"]
        request_id = frame.get("id")
        if request_id in self.subscribes:
            del self.subscribes[request_id]
            if conversation not in self.watched and conversation != self.stalling:
                # Left (unsubscribed) while this answer was on its way: the
                # server has unsubscribed it too, so nothing would keep it.
                return
            self.resyncing.discard(conversation)
            if frame.get("replay") == "live":
                counts["live replays"] += 1
                self.view.setdefault(conversation, {})
            else:
                # A full replay follows: it replaces what we held.
                counts["full replays"] += 1
                self.view[conversation] = {}
        elif str(request_id).startswith("send-"):  # our send made it
            self.view.setdefault(conversation, {})
            self.watched.add(conversation)
            self.user.conversations.add(conversation)

    async def on_message(self, frame: dict[str, Any]) -> None:
        held = self.view.get(frame["conversation"])
        if held is None:
            return
        message = frame["message"]
        counts["snapshots received"] += message["role"] == "assistant"
        if message["superseded"]:
            held.pop(message["id"], None)
            return
        held[message["id"]] = {key: message[key] for key in VIEW_KEYS}

    async def on_start(self, frame: dict[str, Any]) -> None:
        held = self.view.get(frame["conversation"])
        if held is not None:
            held[frame["message"]] = {
                "role": "assistant",
                "content": "",
                "reasoning": "",
                "status": "streaming",
                "seq": 0,
            }

    async def on_delta(self, frame: dict[str, Any]) -> None:
        conversation = frame["conversation"]
        counts["deltas received"] += 1
        held = self.view.get(conversation)
        if held is None or conversation in self.resyncing:
            return  # the snapshot on its way holds it
        message, seq = held.get(frame["message"]), frame["seq"]
        if message is not None and seq <= message["seq"]:
            counts["repeated deltas skipped"] += 1
        elif message is None or seq > message["seq"] + 1:
            counts["gaps (resubscribed)"] += 1
            await self.subscribe(conversation)
        else:
            message["content"] += frame.get("content", "")
            message["reasoning"] += frame.get("reasoning", "")
            message["seq"] = seq

    async def on_end(self, frame: dict[str, Any]) -> None:
        conversation = frame["conversation"]
        held = self.view.get(conversation)
        if held is None or conversation in self.resyncing:
            return
        message = held.get(frame["message"])
        if message is None or message["seq"] < frame["seq"]:
            counts["missed tails (resubscribed)"] += 1
            await self.subscribe(conversation)
        else:
            message["status"] = frame["status"]

    async def on_deleted(self, frame: dict[str, Any]) -> None:
        counts["deleted frames"] += 1
        self.forget(frame["conversation"])
        self.user.conversations.discard(frame["conversation"])

    async def on_error(self, frame: dict[str, Any]) -> None:
        counts[f"error {frame['code']}"] += 1
        conversation = self.subscribes.pop(frame.get("id"), None)
        if conversation is None:
            return
        if frame["code"] == "not_found":
            self.forget(conversation)  # deleted meanwhile
            self.user.conversations.discard(conversation)
        else:  # a server_error, say: ask again in a while, as a page would
            self.retries.add(asyncio.create_task(self.subscribe_later(conversation)))

    async def subscribe_later(self, conversation: str) -> None:
        await asyncio.sleep(1.0)
        if conversation in self.watched:
            await self.subscribe(conversation)

    async def on_pong(self, frame: dict[str, Any]) -> None:
        pong = self.pongs.get(frame.get("id"))
        if pong is not None and not pong.done():
            pong.set_result(None)

    # What the user does.

    def left(self) -> float:
        return self.shared.deadline - time.monotonic()

    async def act(self) -> None:
        """Random actions until the deadline, a think time apart."""
        names, weights = list(ACTIONS), list(ACTIONS.values())
        await asyncio.sleep(self.rng.uniform(0, self.shared.think))
        while self.left() > 0:
            if self.ws is None:
                await self.wait_online()
                continue
            action = self.rng.choices(names, weights)[0]
            await getattr(self, f"do_{action}")()
            await asyncio.sleep(
                min(max(0, self.left()), self.rng.expovariate(1 / self.shared.think))
            )

    async def wait_online(self, seconds: float = ANSWER_TIMEOUT, after: int = -1) -> bool:
        """Wait for a connection (a newer one than generation after)."""
        deadline = time.monotonic() + seconds
        while self.ws is None or self.generation <= after:
            if time.monotonic() > deadline or self.finished:
                return False
            await asyncio.sleep(0.05)
        return True

    def a_conversation(self) -> str | None:
        mine = sorted(self.user.conversations)
        return self.rng.choice(mine) if mine else None

    async def hold(self, conversation: str) -> bool:
        """Show the conversation (subscribe to it) before acting on it, as
        a page does."""
        if conversation in self.view:
            return True
        if len(self.watched) >= MAX_WATCHED:
            await self.leave_one()
        request_id = self.next_id("sub")
        self.subscribes[request_id] = conversation
        self.watched.add(conversation)
        self.resyncing.add(conversation)
        frame = {"type": "subscribe", "conversation": conversation, "id": request_id}
        error, _ = await self.request(frame)
        return error is None and conversation in self.view

    async def leave_one(self) -> None:
        waited_on = {w[0] for w in self.waiters}
        candidates = sorted(self.watched - waited_on)
        if candidates:
            conversation = self.rng.choice(candidates)
            self.forget(conversation)
            counts["unsubscribes"] += 1
            await self.send({"type": "unsubscribe", "conversation": conversation})

    def prompt(self) -> str:
        tag = f"s{self.index}p{next(self.prompts)}"
        words = [tag]
        length = self.rng.randint(20, 240)
        while sum(map(len, words)) + len(words) < length:
            words.append(self.rng.choice(WORDS))
        return " ".join(words)

    def model(self) -> str:
        model = self.rng.choices([m for _, m in MODELS], [w for w, _ in MODELS])[0]
        return model.format(after=self.rng.randint(0, 6))

    async def refused(self, code: str, answers: list[dict]) -> None:
        """Back off as a real client would."""
        if code == "rate_limited":
            retry = next((a.get("retry_after", 1) for a in answers if a["type"] == "error"), 1)
            await asyncio.sleep(min(float(retry), max(0.0, self.left())))
        elif code == "too_many_replies":
            await asyncio.sleep(self.rng.uniform(0.5, 2))

    async def do_send(self) -> None:
        conversation = self.a_conversation() if self.rng.random() < 0.7 else None
        if conversation is not None and not await self.hold(conversation):
            return
        if conversation is None and len(self.watched) >= MAX_WATCHED:
            await self.leave_one()
        before = set(self.view.get(conversation, {})) if conversation else set()
        prompt = self.prompt()
        frame = {"type": "send", "conversation": conversation, "content": prompt}
        frame["model"] = self.model()
        frame["id"] = request_id = self.next_id("send")
        started = time.monotonic()
        error, answers = await self.request(frame)
        if error is not None:
            if error not in ("disconnected", "timeout"):
                self.shared.refused.add(prompt)
            await self.refused(error, answers)
            return
        counts["messages sent"] += 1
        for answer in answers:
            if answer["type"] == "conversation":
                conversation = answer["conversation"]["id"]
                counts["conversations made"] += 1
            if answer["type"] == "message" and answer["message"]["content"] == prompt:
                self.shared.acked[answer["message"]["id"]] = (answer["conversation"], prompt)
        if conversation is None:
            print(f"socket {self.index}: {request_id} had no conversation", file=sys.stderr)
            return
        await self.follow(conversation, before, started)

    async def do_regenerate(self) -> None:
        conversation = self.a_conversation()
        if conversation is None or not await self.hold(conversation):
            return
        before = set(self.view.get(conversation, {}))
        started = time.monotonic()
        error, answers = await self.request({"type": "regenerate", "conversation": conversation})
        if error is not None:
            await self.refused(error, answers)
            return
        counts["regenerates"] += 1
        await self.follow(conversation, before, started)

    async def follow(self, conversation: str, before: set[str], started: float) -> None:
        """Watch our reply, and maybe stop it, reload the page while it
        streams, or go on without waiting for it."""
        first: list[float] = []

        def new_reply() -> dict[str, Any] | None:
            held = self.view.get(conversation, {})
            replies = [m for i, m in held.items() if i not in before and m["role"] == "assistant"]
            if replies and replies[-1]["content"] and not first:
                first.append(time.monotonic())
            return replies[-1] if replies else None

        def ended() -> bool:
            reply = new_reply()
            return conversation not in self.view or (reply is not None and reply["status"] in FINAL)

        done = asyncio.get_running_loop().create_future()
        waiter = (conversation, ended, done)
        self.waiters.append(waiter)
        try:
            choice = self.rng.random()
            stopped_at = None
            if choice < 0.25:
                await asyncio.sleep(self.rng.uniform(0, 1.5))
                if not done.done():
                    stopped_at = time.monotonic()
                    await self.request({"type": "stop", "conversation": conversation})
                    counts["stops"] += 1
            elif choice < 0.35:
                await asyncio.sleep(self.rng.uniform(0, 1.0))
                await self.reload()
            elif choice < 0.45:
                return  # on to something else while it streams
            try:
                await asyncio.wait_for(asyncio.shield(done), REPLY_TIMEOUT)
            except TimeoutError:
                counts["replies not seen ending (client)"] += 1
                return
            now = time.monotonic()
            if first:
                timings["ttft_ms"].append((first[0] - started) * 1000)
            if stopped_at is not None:
                timings["stop_ms"].append((now - stopped_at) * 1000)
        finally:
            self.waiters.remove(waiter)

    async def do_reload(self) -> None:
        await self.reload()

    async def reload(self) -> None:
        ws = self.ws
        if ws is None:
            return
        counts["reloads"] += 1
        self.reloading = True
        self.reconnect_pause = self.rng.uniform(0, 0.5)
        # Behind a load balancer a reload may land on any process.
        self.process = self.rng.randrange(len(self.shared.site.ports))
        generation = self.generation
        await ws.close()
        await self.wait_online(after=generation)

    async def do_slow(self) -> None:
        """Read slowly for a while, and chat meanwhile."""
        counts["slow reads"] += 1
        self.pause = self.rng.uniform(0.02, 0.2)
        self.slow_until = time.monotonic() + self.rng.uniform(2, 8)
        await self.do_send()

    async def do_stall(self) -> None:
        """Ask for the big conversation and read nothing for longer than
        CHAT_SEND_TIMEOUT: the server closes the socket (4002, or a drop),
        and the client comes back to what it showed before."""
        if self.ws is None:
            return
        counts["stalled reads"] += 1
        generation = self.generation
        self.stalled = asyncio.Event()
        request_id = self.next_id("sub")
        self.subscribes[request_id] = self.stalling = self.user.big
        self.resyncing.add(self.user.big)
        # Not watched: a reconnect does not ask for it again.
        await self.send({"type": "subscribe", "conversation": self.user.big, "id": request_id})
        try:
            # The reader stalls once the answer begins (see handle).
            await asyncio.wait_for(self.stalled.wait(), ANSWER_TIMEOUT + STALL)
        except TimeoutError:
            counts["stalls never answered"] += 1
        await asyncio.sleep(2.0)  # for the reader to come to the close, if any
        if self.generation == generation and self.ws is not None:
            counts["stalls the socket survived"] += 1
        self.stalling = None
        self.forget(self.user.big)
        await self.send({"type": "unsubscribe", "conversation": self.user.big})

    async def do_watch(self) -> None:
        conversation = self.a_conversation()
        if conversation is not None and conversation not in self.view:
            counts["subscribes"] += 1
            await self.hold(conversation)

    async def do_delete(self) -> None:
        conversation = self.a_conversation()
        if conversation is None:
            return
        async with self.user.lock:  # one cookie jar per user
            status = await asyncio.to_thread(self.user.delete, conversation)
        counts[f"deletes (HTTP {status})"] += 1
        if status in (200, 404):
            self.user.conversations.discard(conversation)

    async def do_idle(self) -> None:
        pass

    async def ping(self) -> bool:
        """Whether the socket answers: every frame sent before is in."""
        error, _ = await self.request({"type": "ping"})
        return error is None

    async def close(self) -> None:
        self.finished = True
        if self.ws is not None:
            await self.ws.close()


# The checks.


def stored(skip: set[str]) -> tuple[set[str], list[dict[str, Any]]]:
    """The conversations and messages in the database, but the messages of
    the conversations in skip."""
    from django.db import connections

    from conversations.models import Conversation, Message

    conversations = {str(pk) for pk in Conversation.objects.values_list("pk", flat=True)}
    fields = ("id", "conversation_id", "role", "content", "reasoning", "status")
    fields += ("superseded", "created", "error_code", "finish_reason", "ttft_ms")
    messages = Message.objects.exclude(conversation__in=skip).order_by("created", "pk")
    rows = list(messages.values(*fields))
    for row in rows:
        row["id"], row["conversation_id"] = str(row["id"]), str(row["conversation_id"])
    connections.close_all()
    return conversations, rows


def sessions_opened() -> int | None:
    """How many connections Postgres has taken on the soak's database so
    far (None on SQLite): Django opens one for each database call here."""
    from django.db import connection, connections

    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        query = "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
        cursor.execute(query)
        count = cursor.fetchone()[0]
    connections.close_all()
    return count


def live_replies() -> int:
    from django.db import connections

    from conversations.models import Message

    count = Message.objects.filter(status__in=Message.LIVE_STATUSES).count()
    connections.close_all()
    return count


def shown(rows: list[dict[str, Any]]) -> dict[str, dict[str, tuple]]:
    """What a client should show of each conversation: its messages that
    are not superseded."""
    visible: dict[str, dict[str, tuple]] = {}
    for row in rows:
        if not row["superseded"] and row["role"] != "system":
            key = (row["role"], row["content"], row["reasoning"], row["status"])
            visible.setdefault(row["conversation_id"], {})[row["id"]] = key
    return visible


def compare_views(
    clients: list[Client], conversations: set[str], rows: list[dict[str, Any]]
) -> list[str]:
    """Every way a client's view differs from the database."""
    visible = shown(rows)
    problems = []
    for client in clients:
        for conversation, held in client.view.items():
            if conversation in client.resyncing:
                continue  # not shown until its snapshot is in
            if conversation not in conversations:
                problems.append(f"socket {client.index} shows deleted {conversation}")
                continue
            if conversation not in client.watched:
                # The bench's own bug: a conversation nobody keeps up to date.
                problems.append(f"socket {client.index} shows {conversation} it does not follow")
            view = {
                i: (m["role"], m["content"], m["reasoning"], m["status"]) for i, m in held.items()
            }
            want = visible.get(conversation, {})
            for message in sorted(set(view) | set(want)):
                if view.get(message) != want.get(message):
                    problems.append(
                        f"socket {client.index}, conversation {conversation}, message"
                        f" {message}: shows {view.get(message)!r:.300}, stored"
                        f" {want.get(message)!r:.300}"
                    )
    return problems


def last_user_text(messages: list[dict[str, Any]]) -> str | None:
    users = [m for m in messages if m.get("role") == "user"]
    return str(users[-1].get("content")) if users else None


def check_replies(
    shared: Shared,
    conversations: set[str],
    rows: list[dict[str, Any]],
    sent: list[dict[str, Any]],
) -> tuple[list[str], Counter[str]]:
    """Every stored reply against the request the model server got for it.

    A reply answers the conversation's last user message before it; its
    request is the one for that prompt that the server read after the
    reply's row was made (a regenerate is a new request for the same
    prompt, after the previous reply ended: replies in a conversation never
    overlap). A complete reply holds all the server wrote; one stopped or
    cut off holds the start of it, up to where it was cut."""
    problems: list[str] = []
    figures: Counter[str] = Counter()
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for record in sent:
        prompt = last_user_text(record["messages"])
        if prompt is not None:
            by_prompt.setdefault(prompt, []).append(record)
    # conversation -> [(reply row, prompt)], oldest first
    turns: dict[str, list[tuple[dict[str, Any], str]]] = {}
    prompt_of: dict[str, str] = {}
    for row in rows:
        if row["role"] == "user":
            prompt_of[row["conversation_id"]] = row["content"]
        elif row["role"] == "assistant":
            prompt = prompt_of.get(row["conversation_id"], "")
            turns.setdefault(row["conversation_id"], []).append((row, prompt))
    matched: dict[str, list[dict[str, Any]]] = {}
    for replies in turns.values():
        prompts = {prompt for _, prompt in replies}
        for prompt in prompts:
            answering = [row for row, p in replies if p == prompt]
            for record in by_prompt.get(prompt, []):
                made = [row for row in answering if row["created"].timestamp() <= record["time"]]
                if not made:
                    problems.append(
                        f"request {record['id']} came before any reply to {prompt[:30]!r}"
                    )
                    continue
                matched.setdefault(made[-1]["id"], []).append(record)
    for replies in turns.values():
        for row, prompt in replies:
            figures[f"replies {row['status']}"] += 1
            if row["error_code"]:
                figures[f"replies {row['status']} ({row['error_code']})"] += 1
            records = matched.get(row["id"], [])
            problem = reply_problem(row, records, figures)
            if problem:
                problems.append(f"reply {row['id']} to {prompt[:30]!r}: {problem}")
    # A request for a stored prompt, but matched to no reply row: text lost.
    stored_texts = {(r["conversation_id"], r["content"]) for r in rows if r["role"] == "user"}
    stored_prompts = {prompt for _, prompt in stored_texts}
    replied = {record["id"] for records in matched.values() for record in records}
    for record in sent:
        prompt = last_user_text(record["messages"]) or ""
        if record["id"] not in replied and prompt in stored_prompts:
            problems.append(f"request {record['id']} for {prompt[:30]!r} has no stored reply")
    # What the server acknowledged is stored; what it refused is not.
    by_id = {row["id"]: row for row in rows}
    for message, (conversation, prompt) in shared.acked.items():
        row = by_id.get(message)
        if conversation in conversations and (row is None or row["content"] != prompt):
            problems.append(f"acknowledged message {message} ({prompt[:30]!r}) is not stored")
    for conversation, prompt in stored_texts:
        if prompt in shared.refused:
            problems.append(f"refused message {prompt[:30]!r} was stored in {conversation}")
    return problems, figures


def reply_problem(row: dict[str, Any], records: list[dict[str, Any]], figures: Counter) -> str:
    """What is wrong with a stored reply, given the requests matched to it."""
    if row["status"] not in FINAL:
        return f"left {row['status']}"
    if not records:
        figures["replies with no request (ended before asking)"] += 1
        if row["content"] or row["reasoning"]:
            return f"holds {row['content'][:40]!r} but the model server was never asked"
        return ""
    if len(records) > 1:
        figures["replies with several requests"] += 1
    # A complete reply cut at a length cap (CHAT_MAX_REPLY_CHARS) ends where
    # the site hung up, as a stopped one does.
    whole = row["status"] == "complete" and row["finish_reason"] != "length"
    for record in records:
        sent, reasoning = record["content"], record["reasoning"]
        if whole:
            if (row["content"], row["reasoning"]) == (sent, reasoning) and record["finished"]:
                return ""
        elif sent.startswith(row["content"]) and reasoning.startswith(row["reasoning"]):
            if row["content"] != sent:
                # Text on its way when the stop came: written, never read.
                figures[f"{row['status']} short of what was sent"] += 1
            return ""
    record = records[-1]
    return (
        f"stored {row['content']!r:.120} but the server wrote {record['content']!r:.120}"
        f" (finished: {record['finished']})"
    )


ACCESS_LOG = re.compile(r"^\d+\.\d+\.\d+\.\d+:\d+ - - \[")


def log_findings(logs: list[Path]) -> tuple[int, Counter[str]]:
    """The tracebacks in the servers' logs, and how often each other kind
    of line (but requests, and a traceback's own lines) came up."""
    tracebacks = 0
    kinds: Counter[str] = Counter()
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("Traceback"):
                tracebacks += 1
            elif line.strip() and not line[0].isspace() and not ACCESS_LOG.match(line):
                kind = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "…", line)
                kinds[re.sub(r"\d+", "N", kind)[:160]] += 1
    return tracebacks, kinds


def memory_at(
    samples: list[tuple[float, list[float]]], start: float, end: float
) -> tuple[float, list[float]]:
    """Each process's median RSS over the samples from start to end
    seconds (the last sample if none), and when that window began."""
    window = [s for s in samples if start <= s[0] < end] or samples[-1:]
    medians = [statistics.median(values) for values in zip(*(s[1] for s in window), strict=True)]
    return window[0][0], medians


def summary(values: list[float]) -> str:
    if not values:
        return "–"
    values = sorted(values)
    p95 = values[min(len(values) - 1, int(len(values) * 0.95))]
    return f"median {statistics.median(values):.0f}, p95 {p95:.0f}, max {values[-1]:.0f}"


# The run.


async def run(args: argparse.Namespace, site: Site, llm_url: str) -> dict[str, Any]:
    users_made = await asyncio.to_thread(make_users, args.users)
    users = []
    for index, (name, token, big) in enumerate(users_made):
        browser = Browser(site.url(index % len(site.ports)))
        users.append(User(name, token, big, browser))
    await asyncio.gather(*(asyncio.to_thread(u.browser.log_in, u.name) for u in users))
    began = time.monotonic()
    shared = Shared(site, args.seed, began + args.minutes * 60, args.think)
    clients = [Client(shared, i, users[i % len(users)]) for i in range(args.sockets)]
    # Ten at a time: two hundred handshakes at once take more Redis
    # connections than channels-redis's pool has (redis-py's default of
    # 100, which fails rather than waits), and that storm is not what this
    # measures.
    connections = []
    for start in range(0, len(clients), 10):  # itertools.batched is 3.12's
        batch = clients[start : start + 10]
        connections += [asyncio.create_task(c.connection()) for c in batch]
        for client in batch:
            await client.wait_online()
    big = {user.big for user in users}
    pids = [p.pid for p in site.processes]
    samples: list[tuple[float, list[float]]] = []

    async def sample() -> None:
        while time.monotonic() < shared.deadline:
            samples.append((time.monotonic() - began, [rss_mb(pid) for pid in pids]))
            await asyncio.sleep(min(SAMPLE_EVERY, max(0.01, shared.deadline - time.monotonic())))
        samples.append((time.monotonic() - began, [rss_mb(pid) for pid in pids]))

    async def probe() -> None:
        """How long a ping takes, and how late this process's own loop
        wakes: whether latency is the servers' or the bench's."""
        rng = random.Random(args.seed)
        while time.monotonic() < shared.deadline:
            asked = time.monotonic()
            await asyncio.sleep(0.5)
            timings["lag_ms"].append((time.monotonic() - asked - 0.5) * 1000)
            client = rng.choice(clients)
            if client.ws is not None and time.monotonic() > client.slow_until:
                asked = time.monotonic()
                if await client.ping():
                    timings["ping_ms"].append((time.monotonic() - asked) * 1000)

    sampler = asyncio.create_task(sample())
    prober = asyncio.create_task(probe())
    load_start = os.getloadavg()
    cpu_start = [cpu_seconds(pid) for pid in pids]
    sessions_start = await asyncio.to_thread(sessions_opened)
    actors = [asyncio.create_task(c.act()) for c in clients]
    print(f"running until {args.minutes:g} min from now…", flush=True)
    await sampler
    await prober
    load_end = os.getloadavg()
    cpu = [cpu_seconds(pid) - used for pid, used in zip(pids, cpu_start, strict=True)]
    sessions_end = await asyncio.to_thread(sessions_opened)
    _, late = await asyncio.wait(actors, timeout=REPLY_TIMEOUT + ANSWER_TIMEOUT * 3)
    for actor in late:
        actor.cancel()
    counts["actors cut off at the end"] += len(late)
    for actor in actors:
        if actor.done() and not actor.cancelled() and actor.exception():
            raise actor.exception()  # type: ignore[misc]
    for client in clients:
        client.slow_until = 0.0
    # The end: every reply stored with a final status, every socket back.
    drain_began = time.monotonic()
    while await asyncio.to_thread(live_replies):
        if time.monotonic() - drain_began > DRAIN_TIMEOUT:
            break
        await asyncio.sleep(0.5)
    drained_s = time.monotonic() - drain_began
    offline = [c for c in clients if not await c.wait_online(DRAIN_TIMEOUT)]
    if offline:
        counts["sockets that could not reconnect at the end"] = len(offline)
        clients = [c for c in clients if c not in offline]
    # Frames about the last ends may still be on their way: a pong on
    # each socket says its server has sent them; a few rounds for those
    # still travelling through the channel layer.
    await asyncio.sleep(1.0)
    live_problems: list[str] = []
    for _ in range(5):
        await asyncio.gather(*(c.ping() for c in clients))
        conversations, rows = await asyncio.to_thread(stored, big)
        live_problems = compare_views(clients, conversations, rows)
        if not live_problems:
            break
        await asyncio.sleep(2.0)
    # Then each socket asks again for every conversation it shows.
    for client in clients:
        for conversation in sorted(client.watched):
            await client.subscribe(conversation)
    answered = await asyncio.gather(*(c.ping() for c in clients))
    counts["sockets silent at the end"] = answered.count(False)
    conversations, rows = await asyncio.to_thread(stored, big)
    final_problems = compare_views(clients, conversations, rows)
    unsettled = sum(len(c.resyncing) for c in clients)
    if unsettled:
        final_problems.append(f"{unsettled} subscribes unanswered at the end")
    sent = await asyncio.to_thread(fetch_sent, llm_url)
    reply_problems, reply_figures = check_replies(shared, conversations, rows, sent)
    if sent and sent[0]["id"] != 1:
        reply_problems.append("the model server's sent log lost its oldest requests")
    for client in clients:
        await client.close()
    # A client that crashed stopped following the protocol: its checks
    # are void, and that is the bench's bug to fix, so it fails the run.
    for task in connections:
        if task.done() and not task.cancelled() and task.exception() is not None:
            final_problems.append(f"a client crashed: {task.exception()!r}")
        task.cancel()
    await asyncio.gather(*connections, return_exceptions=True)
    # Medians over half a minute: a stalled reader's big replay makes a
    # spike of a few seconds that one sample could land on.
    minute = memory_at(samples, 60.0, 90.0)
    end = memory_at(samples, samples[-1][0] - 30.0, samples[-1][0] + 1.0)
    return {
        "minutes": args.minutes,
        "sockets": args.sockets,
        "users": args.users,
        "processes": len(site.ports),
        "database": site.env["DATABASE_URL"].split(":")[0],
        "channel_layer": "redis" if site.env.get("REDIS_URL") else "in-memory",
        "seed": args.seed,
        "counts": dict(sorted(counts.items())),
        "replies": dict(sorted(reply_figures.items())),
        "requests_to_model": len(sent),
        "conversations_at_end": len(conversations),
        "messages_at_end": len(rows),
        "ttft_ms": summary(timings["ttft_ms"]),
        "server_ttft_ms": summary([r["ttft_ms"] for r in rows if r["ttft_ms"] is not None]),
        "stop_to_end_ms": summary(timings["stop_ms"]),
        "ping_ms": summary(timings["ping_ms"]),
        "bench_loop_lag_ms": summary(timings["lag_ms"]),
        "drain_s": round(drained_s, 1),
        "rss_mb_minute_1": [round(v) for v in minute[1]],
        "rss_mb_end": [round(v) for v in end[1]],
        "rss_ratio": [round(e / m, 3) for m, e in zip(minute[1], end[1], strict=True)],
        "rss_samples": [[round(t), [round(v) for v in values]] for t, values in samples],
        "memory_checked": end[0] - minute[0] >= 60,
        "cpu_percent": [round(100 * used / (args.minutes * 60)) for used in cpu],
        "postgres_sessions_per_s": (
            round((sessions_end - sessions_start) / (args.minutes * 60), 1)
            if sessions_start is not None and sessions_end is not None
            else None
        ),
        "load_average_start": [round(v, 2) for v in load_start],
        "load_average_end": [round(v, 2) for v in load_end],
        "reply_problems": reply_problems,
        "live_view_problems": live_problems,
        "final_view_problems": final_problems,
    }


def table(figures: dict[str, Any]) -> str:
    counted = figures["counts"]
    replies = figures["replies"]
    statuses = ", ".join(
        f"{status} {replies.get('replies ' + status, 0)}"
        for status in ("complete", "stopped", "interrupted", "error")
    )
    causes = ", ".join(
        f"{k.removeprefix('replies ')} {v}"
        for k, v in replies.items()
        if k.startswith("replies ") and k.endswith(")") and "request" not in k
    )
    dropped = ", ".join(f"{k} {v}" for k, v in counted.items() if k.startswith("dropped"))
    errors = ", ".join(f"{k[6:]} {v}" for k, v in counted.items() if k.startswith("error "))
    deletes = ", ".join(f"{k[8:]} {v}" for k, v in counted.items() if k.startswith("deletes"))
    mismatches = len(figures["reply_problems"])
    short = ", ".join(f"{k.split()[0]} {v}" for k, v in replies.items() if "short of" in k)
    ratios = ", ".join(f"{r:.2f}" for r in figures["rss_ratio"])
    rows = [
        (
            "set-up",
            f"{figures['processes']} daphne process(es), {figures['database']},"
            f" {figures['channel_layer']} channel layer, seed {figures['seed']}",
        ),
        (
            "duration",
            f"{figures['minutes']:g} min, then {figures['drain_s']} s for the last replies",
        ),
        ("sockets / users", f"{figures['sockets']} / {figures['users']}"),
        ("messages sent", counted.get("messages sent", 0)),
        ("requests to the model server", figures["requests_to_model"]),
        ("replies by status", statuses),
        ("failed replies by cause", causes or "–"),
        ("stops", counted.get("stops", 0)),
        ("regenerates", counted.get("regenerates", 0)),
        ("reloads", counted.get("reloads", 0)),
        ("deletes", deletes or "–"),
        (
            "slow reads / stalled reads",
            f"{counted.get('slow reads', 0)} / {counted.get('stalled reads', 0)}",
        ),
        ("sockets dropped by the server", dropped or "–"),
        ("error frames", errors or "–"),
        (
            "frames / deltas received",
            f"{counted.get('frames received', 0)} / {counted.get('deltas received', 0)}",
        ),
        (
            "client resyncs (gaps, missed tails)",
            f"{counted.get('gaps (resubscribed)', 0)},"
            f" {counted.get('missed tails (resubscribed)', 0)}",
        ),
        ("connects refused or failed (retried)", counted.get("connects failed", 0)),
        ("client time to first text, ms", figures["ttft_ms"]),
        ("server time to first token, ms", figures["server_ttft_ms"]),
        ("stop → end, ms", figures["stop_to_end_ms"]),
        ("ping → pong, ms", figures["ping_ms"]),
        ("the bench's own event-loop lag, ms", figures["bench_loop_lag_ms"]),
        ("replies shorter than what was sent (in flight at a stop)", short or "–"),
        ("wrong or lost replies and messages", mismatches),
        (
            "client views unlike the database (live, after resubscribe)",
            f"{len(figures['live_view_problems'])}, {len(figures['final_view_problems'])}",
        ),
        ("RSS MiB per process after minute 1", ", ".join(map(str, figures["rss_mb_minute_1"]))),
        ("RSS MiB per process at the end", ", ".join(map(str, figures["rss_mb_end"]))),
        ("RSS end / minute 1", ratios),
        ("CPU per process (% of a core)", ", ".join(map(str, figures["cpu_percent"]))),
        (
            "Postgres connections opened a second",
            "–"
            if figures["postgres_sessions_per_s"] is None
            else figures["postgres_sessions_per_s"],
        ),
        (
            "load average (1 min) at start, end",
            f"{figures['load_average_start'][0]}, {figures['load_average_end'][0]}",
        ),
        ("tracebacks in the servers' logs", figures["server_tracebacks"]),
    ]
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


def verdicts(figures: dict[str, Any]) -> tuple[list[str], bool]:
    """PASS/FAIL lines, and whether any check that fails the run failed."""
    lines = []
    failed = False
    for name, key in (
        ("every reply final and equal to what the model sent", "reply_problems"),
        ("every client's live view equals the database", "live_view_problems"),
        ("every client's view after a resubscribe equals the database", "final_view_problems"),
    ):
        problems = figures[key]
        failed |= bool(problems)
        lines.append(f"{'FAIL' if problems else 'PASS'}  {name}")
        lines += [f"      {p}" for p in problems[:20]]
        if len(problems) > 20:
            lines.append(f"      … and {len(problems) - 20} more")
    if figures["memory_checked"]:
        grown = [r for r in figures["rss_ratio"] if r > 1.10]
        verdict = "FAIL" if grown else "PASS"
        lines.append(f"{verdict}  memory at the end within 10 % of minute 1 (not fatal)")
    else:
        lines.append("----  memory: the run is too short to compare with minute 1")
    return lines, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sockets", type=int, default=200)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--think", type=float, default=5.0, help="mean seconds between actions")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the database and logs")
    args, extra = parser.parse_known_args()
    if any("=" not in item for item in extra):
        parser.error(f"unknown arguments {extra}: site settings go as NAME=value")
    if args.processes > 1 and not os.environ.get("REDIS_URL"):
        parser.error(
            f"--processes {args.processes} needs REDIS_URL: without Redis each process has a"
            " channel layer of its own, and a reply in one never reaches a socket of the"
            " other. Set REDIS_URL (and DATABASE_URL=postgres://…), or use --processes 1."
        )
    if args.users > args.sockets or args.users < 1:
        parser.error("--users must be from 1 to --sockets")
    if args.seed is None:
        args.seed = random.randrange(10**6)
    workdir = Path(tempfile.mkdtemp(prefix="soak-"))
    failed = True
    figures: dict[str, Any] = {}
    try:
        with (
            fake_llm_process(workdir / "fake_llm.log", "--sent-limit", "5000000") as llm_url,
            soak_database(workdir, lambda: args.keep or failed) as database_url,
        ):
            env = {**site_settings(args), "DATABASE_URL": database_url, "LLM_BASE_URL": llm_url}
            env.update(item.split("=", 1) for item in extra)
            site = Site(env, args.processes)
            site.start(workdir)
            try:
                use_database(database_url)
                figures = asyncio.run(run(args, site, llm_url))
            finally:
                site.stop()
            figures["server_tracebacks"], kinds = log_findings(site.logs)
            figures["server_log"] = dict(kinds.most_common())
            print(table(figures))
            lines, failed = verdicts(figures)
            print("\n".join(lines))
            if kinds:
                print("the servers' log, but requests and tracebacks' lines:")
            for kind, count in kinds.most_common(12):
                print(f"  {count:6d} × {kind}")
            if args.json:
                args.json.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    finally:
        if args.keep or failed or figures.get("server_tracebacks"):
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
