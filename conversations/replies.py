"""A reply is written by its own asyncio task, apart from any socket: it
streams from the model server, fans deltas out to the conversation's group
and saves the text about once a second, so a closed tab loses nothing.

Everything another process needs goes through the channel layer: each
running reply listens on a control group of its conversation, where any
process can ask it to stop or for a snapshot of what it has sent so far."""

import asyncio
import copy
import logging
import time
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.cache import cache
from django.utils import timezone

from . import llm
from .models import Conversation, Message

logger = logging.getLogger(__name__)

# Strong references: the event loop keeps only weak ones to tasks.
_running: set[asyncio.Task] = set()
_replies: set["Reply"] = set()
_shutdown_hooked = False


def conversation_group(conversation_id: Any) -> str:
    return f"chat.{conversation_id}"


def control_group(conversation_id: Any) -> str:
    return f"chat.{conversation_id}.control"


def start(conversation: Conversation, reply: Message, origin: str = "", request_id: Any = None):
    """Run the reply in the background and return its task."""
    _hook_shutdown()
    writer = Reply(conversation, reply, origin, request_id)
    task = asyncio.get_running_loop().create_task(writer.run(), name=f"reply-{reply.pk}")
    _running.add(task)
    _replies.add(writer)
    task.add_done_callback(lambda done: (_running.discard(done), _replies.discard(writer)))
    return task


def _hook_shutdown() -> None:
    """Under daphne, a shutdown (a deploy, Ctrl-C) would drop the running
    replies mid-sentence: have the reactor wait while each one saves its
    text as interrupted and tells its tabs, as daphne does for sockets."""
    global _shutdown_hooked
    if _shutdown_hooked:
        return
    _shutdown_hooked = True
    try:
        from twisted.internet import defer, reactor
    except ImportError:
        return
    if not reactor.running:  # not under daphne (tests, scripts)
        return

    async def interrupt_all() -> None:
        for writer in list(_replies):
            writer.interrupt()
        if _running:
            await asyncio.wait(list(_running), timeout=5)

    reactor.addSystemEventTrigger(
        "before",
        "shutdown",
        lambda: defer.Deferred.fromFuture(asyncio.ensure_future(interrupt_all())),
    )


def _stop_key(message_id: Any) -> str:
    return f"chat-stop:{message_id}"


async def request_stop(conversation_id: Any, message_id: Any) -> None:
    """Stop a reply wherever it runs. The note in the cache covers a reply
    that has not started listening yet (its process may be another)."""
    await cache.aset(_stop_key(message_id), True, timeout=300)
    await get_channel_layer().group_send(control_group(conversation_id), {"type": "reply.stop"})


async def snapshot(conversation_id: Any, message_id: Any, wait: float = 1.0) -> dict | None:
    """The live frame of a reply in progress, from whichever process is
    writing it, or None if nobody answers (it has just ended, or its
    process died)."""
    layer = get_channel_layer()
    inbox = await layer.new_channel()
    await layer.group_send(
        control_group(conversation_id),
        {"type": "reply.snapshot", "reply_to": inbox, "message": str(message_id)},
    )
    try:
        answer = await asyncio.wait_for(layer.receive(inbox), wait)
    except TimeoutError:
        return None
    return answer["frame"]


class Reply:
    def __init__(self, conversation: Conversation, message: Message, origin: str, request_id):
        self.conversation_id = str(conversation.pk)
        self.message = message
        self.message_id = str(message.pk)
        self.origin = origin
        self.request_id = request_id
        self.layer = get_channel_layer()
        self.group = conversation_group(self.conversation_id)
        # What the clients have been sent (seq deltas in all), and what is
        # waiting for the next coalesced delta.
        self.content = self.reasoning = ""
        self.pending_content = self.pending_reasoning = ""
        self.seq = 0
        self.usage = llm.Usage(None, None)
        self.started = time.monotonic()
        self.first_token: float | None = None
        self.last_save = self.started
        self.stopping = False
        self.shutting_down = False
        self.finishing = False
        self.wake = asyncio.Event()
        self.stream: asyncio.Task | None = None

    async def run(self) -> None:
        control = await self.layer.new_channel()
        await self.layer.group_add(control_group(self.conversation_id), control)
        listener = asyncio.create_task(self._listen(control))
        if await cache.aget(_stop_key(self.message_id)):
            self.stopping = True
        pump: asyncio.Task | None = None
        status, error = Message.Status.COMPLETE, None
        try:
            history = await database_sync_to_async(self._history)()
            await self._broadcast(
                {
                    "type": "start",
                    "conversation": self.conversation_id,
                    "message": self.message_id,
                    "model": self.message.model,
                }
            )
            self.started = time.monotonic()
            pump = asyncio.create_task(self._pump())
            self.stream = asyncio.create_task(self._stream(history))
            if self.stopping:  # Stop came while the history was loading
                self.stream.cancel()
            try:
                await self.stream
            except asyncio.CancelledError:
                if not self.stopping:
                    raise
            except llm.LLMError as exc:
                error = exc
            if self.stream.cancelled() and self.shutting_down:
                status = Message.Status.INTERRUPTED
                error = llm.LLMError("interrupted", "The server was restarted during this reply.")
            elif self.stream.cancelled():
                status = Message.Status.STOPPED
            elif error is not None:
                started_answer = bool(self.content or self.pending_content)
                status = Message.Status.INTERRUPTED if started_answer else Message.Status.ERROR
            self.finishing = True
            self.wake.set()
            await pump
            # What arrived while the pump's last delta was being sent.
            await self._flush()
        except Exception as exc:  # never leave a row half-written
            logger.exception("reply %s failed", self.message_id)
            error = error or llm.LLMError("upstream_error", f"Internal error: {exc}")
            status = Message.Status.ERROR
            # Keep every word that arrived, sent to the sockets or not.
            self.content += self.pending_content
            self.reasoning += self.pending_reasoning
            self.pending_content = self.pending_reasoning = ""
        finally:
            for task in (listener, pump, self.stream):
                if task is not None and not task.done():
                    task.cancel()
            await self.layer.group_discard(control_group(self.conversation_id), control)
        await self._finish(status, error)

    def _history(self) -> list[dict[str, str]]:
        return Conversation.objects.get(pk=self.conversation_id).history()

    async def _stream(self, history: list[dict[str, str]]) -> None:
        chunks = llm.stream_chat(history, self.message.model, self.message.options)
        try:
            async for piece in chunks:
                if isinstance(piece, llm.Usage):
                    self.usage = piece
                    continue
                if self.first_token is None:
                    self.first_token = time.monotonic()
                self.pending_content += piece.content
                self.pending_reasoning += piece.reasoning
                self.wake.set()
        finally:
            # Closing the generator closes the HTTP response: the model
            # server stops generating for a reply nobody will read.
            await chunks.aclose()

    async def _pump(self) -> None:
        """Sends what has arrived as one delta, then waits out the coalescing
        window: the first token goes at once, later ones in batches. A failed
        save or send is logged and tried again at the next turn: the text
        stays in memory, and the stream goes on."""
        window = settings.CHAT_COALESCE_MS / 1000
        heartbeat = Message.HEARTBEAT.total_seconds()
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), heartbeat)
            except TimeoutError:
                # Still alive, though quiet: say so to the database and to the
                # sockets, which otherwise take a long silence for a death.
                await self._guarded(self._save())
                await self._guarded(
                    self.layer.group_send(
                        self.group,
                        {
                            "type": "chat.alive",
                            "conversation": self.conversation_id,
                            "message": self.message_id,
                        },
                    )
                )
                continue
            self.wake.clear()
            await self._guarded(self._flush())
            if self.finishing:
                return
            if time.monotonic() - self.last_save >= settings.CHAT_SAVE_INTERVAL:
                await self._guarded(self._save())
            await asyncio.sleep(window)

    async def _guarded(self, work) -> None:
        try:
            await work
        except Exception:
            logger.exception("reply %s: save or send failed; trying again", self.message_id)
            self.last_save = time.monotonic()  # no retry storm

    async def _flush(self) -> None:
        if not (self.pending_content or self.pending_reasoning):
            return
        frame: dict[str, Any] = {
            "type": "delta",
            "conversation": self.conversation_id,
            "message": self.message_id,
        }
        if self.pending_content:
            frame["content"] = self.pending_content
        if self.pending_reasoning:
            frame["reasoning"] = self.pending_reasoning
        # Text, seq and snapshot change together, with no await between, so
        # a snapshot always matches exactly the deltas numbered up to it.
        self.seq += 1
        frame["seq"] = self.seq
        self.content += self.pending_content
        self.reasoning += self.pending_reasoning
        self.pending_content = self.pending_reasoning = ""
        await self._broadcast(frame)

    def interrupt(self) -> None:
        self.shutting_down = self.stopping = True
        if self.stream is not None:
            self.stream.cancel()

    async def _listen(self, control: str) -> None:
        while True:
            event = await self.layer.receive(control)
            if event["type"] == "reply.stop" and not self.stopping:
                self.stopping = True
                if self.stream is not None:
                    self.stream.cancel()
            elif event["type"] == "reply.snapshot" and event.get("message") == self.message_id:
                await self.layer.send(
                    event["reply_to"], {"type": "reply.snapshot", "frame": self.frame()}
                )

    def frame(self) -> dict[str, Any]:
        # A copy: a save of self.message may be running in a worker thread.
        message = copy.copy(self.message)
        message.content, message.reasoning, message.seq = self.content, self.reasoning, self.seq
        return message.as_frame()

    async def _save(self, **extra: Any) -> None:
        values = {"content": self.content, "reasoning": self.reasoning, "seq": self.seq}
        values.update(extra, updated=timezone.now())
        saved = await Message.objects.filter(pk=self.message_id).aupdate(**values)
        self.last_save = time.monotonic()
        if not saved and not self.stopping:
            # The conversation was deleted: nobody is left to read the reply.
            logger.info("reply %s: its row is gone; stopping", self.message_id)
            self.stopping = True
            if self.stream is not None:
                self.stream.cancel()

    async def _finish(self, status: str, error: llm.LLMError | None) -> None:
        now = time.monotonic()
        message = copy.copy(self.message)
        message.content, message.reasoning, message.seq = self.content, self.reasoning, self.seq
        message.status = status
        if error is not None:
            message.error_code, message.error = error.code, error.message
        if self.first_token is not None:
            message.ttft_ms = round((self.first_token - self.started) * 1000)
        message.duration_ms = round((now - self.started) * 1000)
        message.prompt_tokens = self.usage.prompt_tokens
        message.completion_tokens = self.usage.completion_tokens
        fields = ["status", "error_code", "error", "ttft_ms", "duration_ms"]
        fields += ["prompt_tokens", "completion_tokens"]
        for attempt in range(3):
            try:
                await self._save(**{field: getattr(message, field) for field in fields})
                break
            except Exception:
                logger.exception("saving reply %s failed (attempt %d)", self.message_id, attempt)
                await asyncio.sleep(0.5 * (attempt + 1))
        frame: dict[str, Any] = {
            "type": "end",
            "conversation": self.conversation_id,
            "message": self.message_id,
            "status": status,
            "seq": self.seq,
            "usage": message.usage(),
            "timing": message.timing(),
        }
        if error is not None:
            frame["error"] = {"code": error.code, "message": error.message}
        await self._broadcast(frame)
        if error is not None and self.origin and not self.shutting_down:
            answer = {
                "type": "error",
                "code": error.code,
                "message": error.message,
                "conversation": self.conversation_id,
            }
            if self.request_id is not None:
                answer["id"] = self.request_id
            await self.layer.send(self.origin, {"type": "chat.event", "frame": answer})

    async def _broadcast(self, frame: dict[str, Any]) -> None:
        event = {"type": "chat.event", "conversation": self.conversation_id, "frame": frame}
        await self.layer.group_send(self.group, event)
