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
from collections.abc import Awaitable, Mapping
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.utils import timezone

from . import llm, protocol, titles
from .layers import channel_layer
from .models import Conversation, Message
from .signins import user_group

logger = logging.getLogger(__name__)

# Every running reply, by its task. Also the strong references the tasks
# need: the event loop keeps only weak ones.
_running: dict[asyncio.Task, "ReplyWriter"] = {}
_swept = False

# Seconds between the tries of a reply's final save; then, once its end has
# told the tabs it could not be saved, between the later tries that still
# hold its text (about two minutes in all, for a database that comes back).
FINAL_SAVE_DELAYS: tuple[float, ...] = (0.5, 1.0)
LATER_SAVE_DELAYS: tuple[float, ...] = (2.0, 5.0, 10.0, 30.0, 60.0)
UNSAVED_TEXT = "The reply could not be saved; the server keeps trying for a few minutes."
# Seconds between a reply's tries to listen on its control group again,
# after the channel layer failed (Redis gone, or back without the group).
CONTROL_RETRY = 1.0


def conversation_group(conversation_id: Any) -> str:
    return f"chat.{conversation_id}"


def control_group(conversation_id: Any) -> str:
    return f"chat.{conversation_id}.control"


def start(
    conversation: Conversation, reply: Message, origin: str = "", request_id: Any = None
) -> asyncio.Task:
    """Run the reply in the background and return its task."""
    writer = ReplyWriter(conversation, reply, origin, request_id)
    task = asyncio.get_running_loop().create_task(writer.run(), name=f"reply-{reply.pk}")
    _running[task] = writer
    task.add_done_callback(lambda done: _running.pop(done, None))
    return task


def interrupt_all() -> None:
    """Cut every running reply off, as a server shutdown does: each saves
    its text as interrupted and tells its tabs."""
    for writer in list(_running.values()):
        writer.interrupt()


async def wait_all(timeout: float = 10.0) -> None:
    """Wait for the running replies to end, then for the title requests
    they started (titles.py); cancel what is still running after timeout
    seconds in all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await _wait_or_cancel(list(_running), timeout)
    await _wait_or_cancel(titles.running(), max(deadline - loop.time(), 0.0))


async def _wait_or_cancel(tasks: list[asyncio.Task], timeout: float) -> None:
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=timeout)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)


async def announce_to_owner(
    owner_id: Any, conversation_id: Any, frame: Mapping[str, object]
) -> None:
    """Send a conversation frame to every socket of the conversation's
    owner, in any process, subscribed to it or not: each lists the
    conversation in its sidebar."""
    event = {"type": "chat.conversation", "conversation": str(conversation_id), "frame": frame}
    await channel_layer().group_send(user_group(owner_id), event)


async def broadcast(
    conversation_id: Any, frame: Mapping[str, object], skip: str | None = None
) -> None:
    """Send a frame to every socket subscribed to the conversation, in any
    process; but the socket whose channel is skip."""
    event = {"type": "chat.event", "conversation": str(conversation_id), "frame": frame}
    if skip is not None:
        event["skip"] = skip
    await channel_layer().group_send(conversation_group(conversation_id), event)


async def broadcast_path(conversation_id: Any, skip: str | None = None) -> None:
    """Every socket subscribed to the conversation, in any process (but
    skip), replays its active path: an edit or a switch changed it."""
    event = {"type": "chat.path", "conversation": str(conversation_id)}
    if skip is not None:
        event["skip"] = skip
    await channel_layer().group_send(conversation_group(conversation_id), event)


async def announce_deleted(conversation_id: str) -> None:
    """Every socket subscribed to the conversation, in any process, is told
    it is gone and leaves it."""
    event = {"type": "chat.deleted", "conversation": conversation_id}
    await channel_layer().group_send(conversation_group(conversation_id), event)


def _stop_key(message_id: Any) -> str:
    return f"chat-stop:{message_id}"


async def request_stop(conversation_id: Any, message_id: Any) -> None:
    """Stop a reply wherever it runs. The note in the cache covers a reply
    that has not started listening yet (its process may be another)."""
    await cache.aset(_stop_key(message_id), True, timeout=300)
    await channel_layer().group_send(control_group(conversation_id), {"type": "reply.stop"})


async def snapshot(conversation_id: Any, message_id: Any, wait: float = 1.0) -> dict | None:
    """The live frame of a reply in progress, from whichever process is
    writing it, or None if nobody answers (it has just ended, or its
    process died)."""
    layer = channel_layer()
    inbox = await layer.new_channel()
    await layer.group_send(
        control_group(conversation_id),
        {"type": "reply.snapshot", "reply_to": inbox, "message": str(message_id)},
    )
    receiving = asyncio.ensure_future(layer.receive(inbox))
    if not (await asyncio.wait({receiving}, timeout=wait))[0]:
        # Nobody answered: post our own empty answer rather than cancel the
        # receive (see receive_uncancelled).
        await layer.send(inbox, {"type": "reply.snapshot", "frame": None})
    answer = await receive_uncancelled(receiving)
    return answer["frame"] if answer else None


async def receive_uncancelled(receiving: asyncio.Future, timeout: float = 10.0) -> Any:
    """Wait for a channel-layer receive that has been sent something to end
    it. A receive must not be cancelled: channels-redis pops the next message
    for any channel of this process from one shared Redis queue, and a
    receive cancelled while it waits for that pop loses the message, which
    may be another socket's delta (django/channels_redis#366). Cancelled only
    if it has not ended after timeout seconds (Redis gone, say)."""
    # asyncio.wait, unlike awaiting the receive itself, neither cancels it
    # nor swallows a cancellation of the task that waits here.
    if not (await asyncio.wait({receiving}, timeout=timeout))[0]:
        logger.warning("a channel-layer receive did not end; cancelling it")
        receiving.cancel()
        await asyncio.wait({receiving})
    if receiving.cancelled():
        return None
    if (error := receiving.exception()) is not None:
        logger.error("a channel-layer receive failed", exc_info=error)
        return None
    return receiving.result()


async def current(message: Message) -> dict[str, Any]:
    """A message as it is now: for a reply in progress, the snapshot of the
    process writing it, which is newer than the database. A live reply that
    no process answers for, silent past Message.stale_after(), has lost its
    writer: it is marked interrupted, and every tab still waiting is told,
    and given its text as kept (a tab may have been shown more, sent after
    the last save)."""
    if message.is_live:
        frame = await snapshot(message.conversation_id, message.pk)
        if frame is not None:
            return frame
        message = await _reread(message.pk)
        if message.is_stale():
            if await database_sync_to_async(message.mark_interrupted)():
                kept = protocol.message_frame(message.conversation_id, message.as_frame())
                await broadcast(message.conversation_id, kept)
                await broadcast(message.conversation_id, protocol.end_frame(message))
            else:  # its writer saved meanwhile: it is alive, or has ended
                message = await _reread(message.pk)
    return message.as_frame()


async def _reread(message_id: Any) -> Message:
    message = await database_sync_to_async(Message.objects.for_frame)(message_id)
    if message is None:
        raise Message.DoesNotExist
    return message


async def sweep_orphans_once() -> None:
    """Replies left streaming by a process that died: the first socket of a
    process clears them up, whatever server runs us."""
    global _swept
    if not _swept:
        _swept = True
        await database_sync_to_async(Message.objects.interrupt_orphans)()


def drop_broken_connection() -> None:
    """Close this thread's database connection if the database dropped it.
    It stays broken, and Django opens a new one only once it is closed,
    which channels does around socket events: with no socket busy, every
    retry would fail on it ("the connection is closed") however long the
    database has been back. As Django's close_old_connections() does it."""
    if connection.errors_occurred:
        if connection.is_usable():
            connection.errors_occurred = False
        else:
            connection.close()


class ReplyWriter:
    def __init__(self, conversation: Conversation, message: Message, origin: str, request_id):
        self.conversation_id = str(conversation.pk)
        self.message = message
        self.message_id = str(message.pk)
        self.origin = origin
        self.request_id = request_id
        self.layer = channel_layer()
        self.group = conversation_group(self.conversation_id)
        # What the clients have been sent (seq deltas in all), and what is
        # waiting for the next coalesced delta.
        self.content = self.reasoning = ""
        self.pending_content = self.pending_reasoning = ""
        self.seq = 0
        # The reply's length so far, against the caps: streamed chunks
        # (about one token each) and characters of content and reasoning.
        self.tokens = self.length = 0
        self.finish_reason = ""
        self.usage = llm.Usage(None, None)
        self.started = time.monotonic()
        self.first_token: float | None = None
        self.last_save = self.started
        # How the reply ends if its stream is cancelled; set by _cancel() only.
        self.outcome: Message.Status | None = None
        self.finishing = False
        self.wake = asyncio.Event()
        self.stream: asyncio.Task | None = None
        self.saving: asyncio.Task | None = None
        self.control_closed = False

    async def run(self) -> None:
        control = await self.layer.new_channel()
        # Joined before the stream starts, so that a stop or a snapshot
        # request from then on reaches us; without Redis the reply is
        # written all the same, and the listener joins once it is back.
        joined = await self._join_control(control)
        listener = asyncio.create_task(self._listen(control, joined))
        pump: asyncio.Task | None = None
        status, error = Message.Status.COMPLETE, None
        try:
            history = await database_sync_to_async(self._history)()
            start = protocol.start_frame(self.message)
            await self._tell(self._broadcast(start), "start")
            self.started = time.monotonic()
            pump = asyncio.create_task(self._pump())
            self.stream = asyncio.create_task(self._stream(history))
            if self.outcome is not None:  # Stop came while the history was loading
                self.stream.cancel()
            try:
                await self.stream
            except asyncio.CancelledError:
                if self.outcome is None:
                    raise
            except llm.LLMError as exc:
                error = exc
            if self.stream.cancelled():
                # Only _cancel (a Stop or a shutdown) sets the outcome before
                # cancelling; a cancel without one was re-raised above.
                assert self.outcome is not None
                status = self.outcome
                if status == Message.Status.INTERRUPTED:
                    error = llm.LLMError(protocol.ErrorCode.INTERRUPTED, protocol.INTERRUPTED_TEXT)
            elif error is not None:
                started_answer = bool(self.content or self.pending_content)
                status = Message.Status.INTERRUPTED if started_answer else Message.Status.ERROR
            self.finishing = True
            self.wake.set()
            await pump
            # What arrived while the pump's last delta was being sent.
            await self._flush()
        except Conversation.DoesNotExist:
            # Deleted since the turn began: its tabs were told so, and the
            # row this reply would be written into is gone with it.
            logger.info("reply %s: its conversation is gone", self.message_id)
            status = Message.Status.STOPPED
        except Exception as exc:  # never leave a row half-written
            # The exception's text may say anything about our internals:
            # it goes to the log and the admin, and the user gets a plain sentence.
            logger.exception("reply %s failed", self.message_id)
            error = error or llm.LLMError(
                protocol.ErrorCode.UPSTREAM_ERROR, "The reply failed on the server.", repr(exc)
            )
            status = Message.Status.ERROR
            # Keep every word that arrived, sent to the sockets or not.
            self.content += self.pending_content
            self.reasoning += self.pending_reasoning
            self.pending_content = self.pending_reasoning = ""
        finally:
            for task in (pump, self.stream):
                if task is not None and not task.done():
                    task.cancel()
            await self._saved()
            await self._stop_listening(listener, control)
        await self._finish(status, error)

    async def _join_control(self, control: str) -> bool:
        """Listen on the conversation's control group, and take a stop that
        came before (noted in the cache); False if Redis is away."""
        try:
            await self.layer.group_add(control_group(self.conversation_id), control)
            if await cache.aget(_stop_key(self.message_id)):
                self._cancel(Message.Status.STOPPED)
        except Exception as exc:
            logger.warning("reply %s: cannot listen for stops yet: %r", self.message_id, exc)
            return False
        return True

    async def _stop_listening(self, listener: asyncio.Task, control: str) -> None:
        self.control_closed = True
        try:
            await self.layer.group_discard(control_group(self.conversation_id), control)
            await self.layer.send(control, {"type": "reply.close"})
        except Exception:  # the reply is saved all the same
            logger.exception("reply %s: could not close its control channel", self.message_id)
            listener.cancel()
        await receive_uncancelled(listener)

    def _history(self) -> list[dict[str, str]]:
        conversation = Conversation.objects.get(pk=self.conversation_id)
        return conversation.history(upto=self.message.parent_id)

    async def _stream(self, history: list[dict[str, str]]) -> None:
        options = dict(self.message.options or {})
        if options.get("max_tokens") is None:
            # Without it a model server may write until its context is full.
            options["max_tokens"] = settings.CHAT_MAX_TOKENS
        chunks = llm.stream_chat(history, self.message.model, options)
        deadline = settings.CHAT_REPLY_DEADLINE
        try:
            # The read timeout is per read: a server that streams slowly
            # but steadily would hold a reply, and a model slot, forever.
            async with asyncio.timeout(deadline):
                async for piece in chunks:
                    if isinstance(piece, llm.Usage):
                        self.usage = piece
                    elif isinstance(piece, llm.ServedBy):
                        self.message.model = piece.model[: protocol.MAX_MODEL]
                    elif isinstance(piece, llm.LengthCut):
                        self.finish_reason = protocol.FINISH_LENGTH
                    elif not self._take(piece):
                        return
        except TimeoutError:
            raise llm.LLMError(
                protocol.ErrorCode.TIMEOUT,
                f"The reply took longer than {deadline:g} seconds and was cut off there.",
                f"CHAT_REPLY_DEADLINE ({deadline:g} s) passed",
            ) from None
        finally:
            # Closing the generator closes the HTTP response: the model
            # server stops generating for a reply nobody will read.
            await chunks.aclose()

    def _take(self, piece: llm.Delta) -> bool:
        """Queue a piece for the next delta, cut to the length caps; False
        once the reply has reached one, and must end."""
        if self.first_token is None:
            self.first_token = time.monotonic()
        room = settings.CHAT_MAX_REPLY_CHARS - self.length
        content = piece.content[:room]
        reasoning = piece.reasoning[: room - len(content)]
        self.pending_content += content
        self.pending_reasoning += reasoning
        self.length += len(content) + len(reasoning)
        self.tokens += 1
        self.wake.set()
        if self.length >= settings.CHAT_MAX_REPLY_CHARS or self.tokens >= settings.CHAT_MAX_TOKENS:
            self.finish_reason = protocol.FINISH_LENGTH
            return False
        return True

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
                self._save_in_background()
                alive = {
                    "type": "chat.alive",
                    "conversation": self.conversation_id,
                    "message": self.message_id,
                }
                await self._guarded(self.layer.group_send(self.group, alive))
                continue
            self.wake.clear()
            await self._guarded(self._flush())
            if self.finishing:
                return
            if time.monotonic() - self.last_save >= settings.CHAT_SAVE_INTERVAL:
                self._save_in_background()
            await asyncio.sleep(window)

    def _save_in_background(self) -> None:
        """A save waits for the database (one thread, shared by every socket
        and reply of the process): the deltas must not wait with it. One at
        a time, so saves land in order."""
        if self.saving is None or self.saving.done():
            self.last_save = time.monotonic()
            self.saving = asyncio.create_task(self._guarded(self._save()))

    async def _saved(self) -> None:
        """Wait for a background save, so that none lands after the final one."""
        if self.saving is not None:
            await asyncio.wait({self.saving})

    async def _guarded(self, work) -> None:
        try:
            await work
        except Exception:
            logger.exception("reply %s: save or send failed; trying again", self.message_id)
            self.last_save = time.monotonic()  # no retry storm

    async def _flush(self) -> None:
        if not (self.pending_content or self.pending_reasoning):
            return
        # Text, seq and snapshot change together, with no await between, so
        # a snapshot always matches exactly the deltas numbered up to it.
        # Text too big for one frame goes as several deltas, numbered on.
        frames = protocol.delta_frames(
            self.conversation_id,
            self.message_id,
            self.seq + 1,
            self.pending_content,
            self.pending_reasoning,
        )
        self.seq += len(frames)
        self.content += self.pending_content
        self.reasoning += self.pending_reasoning
        self.pending_content = self.pending_reasoning = ""
        for frame in frames:
            await self._broadcast(frame)

    def interrupt(self) -> None:
        self._cancel(Message.Status.INTERRUPTED)

    def _cancel(self, outcome: Message.Status) -> None:
        """End the stream now, the reply to be saved as outcome. The first
        cancel wins, but for a shutdown, which outranks a stop: the process
        is going away, so the reply is interrupted and no tab is told of an
        error it cannot act on."""
        if self.outcome is not None and outcome != Message.Status.INTERRUPTED:
            return
        self.outcome = outcome
        if self.stream is not None:
            self.stream.cancel()

    async def _listen(self, control: str, joined: bool) -> None:
        """Answer stops and snapshot requests until the reply ends. A Redis
        that dies takes the group with it, and comes back without: join
        again, or a stop would never reach the reply."""
        while not self.control_closed:
            if not joined:
                await asyncio.sleep(CONTROL_RETRY)
                if not self.control_closed:
                    joined = await self._join_control(control)
                continue
            try:
                event = await self.layer.receive(control)
            except Exception as exc:
                logger.warning("reply %s: its control channel failed: %r", self.message_id, exc)
                joined = False
                continue
            if event["type"] == "reply.close":
                return
            if event["type"] == "reply.stop":
                self._cancel(Message.Status.STOPPED)
            elif event["type"] == "reply.snapshot" and event.get("message") == self.message_id:
                answer = {"type": "reply.snapshot", "frame": self.frame()}
                # Unanswered, the asker falls back to the saved row.
                await self._tell(self.layer.send(event["reply_to"], answer), "snapshot")

    def frame(self) -> dict[str, Any]:
        # A copy: a save of self.message may be running in a worker thread.
        message = copy.copy(self.message)
        message.content, message.reasoning, message.seq = self.content, self.reasoning, self.seq
        return message.as_frame()

    async def _save(self, **extra: Any) -> None:
        values = {"content": self.content, "reasoning": self.reasoning, "seq": self.seq}
        values.update(extra, updated=timezone.now())
        saved = await sync_to_async(self._update)(values)
        self.last_save = time.monotonic()
        if not saved and self.outcome is None:
            # The conversation was deleted: nobody is left to read the reply.
            logger.info("reply %s: its row is gone; stopping", self.message_id)
            self._cancel(Message.Status.STOPPED)

    def _update(self, values: dict[str, Any]) -> int:
        drop_broken_connection()
        return Message.objects.filter(pk=self.message_id).update(**values)

    async def _finish(self, status: str, error: llm.LLMError | None) -> None:
        now = time.monotonic()
        message = copy.copy(self.message)
        message.content, message.reasoning, message.seq = self.content, self.reasoning, self.seq
        message.status = status
        if error is not None:
            message.error_code, message.error = error.code, error.message
            message.error_detail = error.detail
        message.finish_reason = self.finish_reason
        if self.first_token is not None:
            message.ttft_ms = round((self.first_token - self.started) * 1000)
        message.duration_ms = round((now - self.started) * 1000)
        message.prompt_tokens = self.usage.prompt_tokens
        message.completion_tokens = self.usage.completion_tokens
        fields = ["status", "model", "error_code", "error", "error_detail", "finish_reason"]
        fields += ["ttft_ms", "duration_ms"]
        fields += ["prompt_tokens", "completion_tokens"]
        values = {field: getattr(message, field) for field in fields}
        saved = await self._save_with_retries(values, FINAL_SAVE_DELAYS, "final")
        told = message
        if not saved:
            # end says what the database holds: never `complete` for a
            # reply that is not kept (docs/protocol.md, "end").
            told = copy.copy(message)
            told.status = Message.Status.ERROR
            told.error_code, told.error = protocol.ErrorCode.SERVER_ERROR, UNSAVED_TEXT
            error = llm.LLMError(protocol.ErrorCode.SERVER_ERROR, UNSAVED_TEXT)
        # With Redis gone these reach nobody; the reply is saved (or kept
        # for a later save) all the same, and a tab that reconnects reads it.
        await self._tell(self._broadcast(protocol.end_frame(told)), "end")
        if error is not None and self.origin and self.outcome != Message.Status.INTERRUPTED:
            answer = protocol.error_frame(
                error.code, error.message, self.request_id, self.conversation_id
            )
            event = {"type": "chat.event", "frame": answer}
            await self._tell(self.layer.send(self.origin, event), "error")
        if saved and status == Message.Status.COMPLETE:
            # Its own task, started once the end is out: a title never
            # holds up a reply, nor a reply its title.
            titles.suggest_later(self.conversation_id, self.message_id)
        if not saved:
            await self._save_later(values, message)

    async def _save_with_retries(
        self, values: dict[str, Any], delays: tuple[float, ...], which: str
    ) -> bool:
        for attempt in range(len(delays) + 1):
            if attempt:
                await asyncio.sleep(delays[attempt - 1])
            try:
                await self._save(**values)
            except Exception:
                logger.exception(
                    "%s save of reply %s failed (try %d)", which, self.message_id, attempt
                )
            else:
                return True
        return False

    async def _save_later(self, values: dict[str, Any], message: Message) -> None:
        """The text is still only here: keep trying, a bounded number of
        times, and say in the log what is lost if every try fails. Once
        saved, the tabs are given the reply as it ended (message): their
        `end` said it could not be saved."""
        lost = (
            f"reply {self.message_id} could not be saved: {len(self.content)} characters"
            f" of content and {len(self.reasoning)} of reasoning are lost"
        )
        try:
            await asyncio.sleep(LATER_SAVE_DELAYS[0])
            if await self._save_with_retries(values, LATER_SAVE_DELAYS[1:], "later"):
                logger.info("reply %s saved after its end", self.message_id)
                kept = protocol.message_frame(self.conversation_id, message.as_frame())
                await self._tell(self._broadcast(kept), "saved message")
                return
        except asyncio.CancelledError:
            logger.error("%s (the server stopped)", lost)
            raise
        logger.error("%s", lost)

    async def _broadcast(self, frame: Any) -> None:
        await broadcast(self.conversation_id, frame)

    async def _tell(self, sending: Awaitable[None], what: str) -> None:
        """Send a frame that is not worth failing the reply for."""
        try:
            await sending
        except Exception as exc:
            logger.warning("reply %s: its %s could not be sent: %r", self.message_id, what, exc)
