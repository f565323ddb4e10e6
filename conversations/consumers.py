"""The WebSocket protocol v1 (docs/protocol.md): validate a frame, check
permission, hand off to the models and to replies.py."""

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.core.cache import cache
from django.db import transaction

from . import llm, replies
from .models import ApiToken, Busy, Conversation, Message, NothingToAnswer

logger = logging.getLogger(__name__)

PROTOCOL = 1
CLOSE_TOKEN_REVOKED = 4001
RENEW_EVERY = 3600  # seconds
MAX_FRAME = 256 * 1024
MAX_ID = 64
OPTION_RANGES: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    "max_tokens": (int, 1, 1_000_000),
    "seed": (int, -(2**63), 2**63 - 1),
}


class FrameError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def bad_request(message: str) -> FrameError:
    return FrameError("bad_request", message)


NOT_FOUND = "No such conversation."
BUSY = "A reply is still being written in this conversation."


class ChatConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        self.user = self.scope.get("user")
        if self.user is None or not self.user.is_authenticated:
            await self.close()
            return
        self.subscriptions: set[str] = set()
        # The seq of each live reply that this client holds, so it gets
        # every delta after it once: none missed, none repeated.
        self.held: dict[str, int] = {}
        # When each held reply was last heard from (a delta or a heartbeat),
        # and which conversation it is in.
        self.heard: dict[str, float] = {}
        self.held_in: dict[str, str] = {}
        self.token = self.scope.get("api_token")
        if self.token is not None:
            await self.channel_layer.group_add(self.token.group, self.channel_name)
        await self.accept()
        self.watchdog = asyncio.create_task(self.watch_replies())
        await _interrupt_orphans_once()
        try:
            models, state = await llm.list_models(), "ok"
        except llm.LLMError:
            models, state = [], "unavailable"
        await self.send_json(
            {
                "type": "ready",
                "user": self.user.get_username(),
                "protocol": PROTOCOL,
                "models": models,
                "default_model": await llm.default_model(),
                "llm": state,
            }
        )

    async def disconnect(self, code: int) -> None:
        if hasattr(self, "watchdog"):
            self.watchdog.cancel()
        if getattr(self, "token", None) is not None:
            await self.channel_layer.group_discard(self.token.group, self.channel_name)
        for conversation_id in getattr(self, "subscriptions", ()):
            await self.channel_layer.group_discard(
                replies.conversation_group(conversation_id), self.channel_name
            )

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None):
        if text_data is None:
            await self.send_error("bad_request", "Frames must be JSON text.")
            return
        if len(text_data) > MAX_FRAME:
            await self.send_error("too_large", f"Frames are limited to {MAX_FRAME} characters.")
            return
        try:
            frame = json.loads(text_data)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            await self.send_error("bad_request", "That frame is not valid JSON.")
            return
        await self.receive_json(frame)

    async def receive_json(self, frame: Any, **kwargs) -> None:
        request_id = frame.get("id") if isinstance(frame, dict) else None
        if (
            not isinstance(request_id, str)
            or len(request_id) > MAX_ID
            or not _encodable(request_id)
        ):
            request_id = None
        try:
            if not isinstance(frame, dict):
                raise bad_request("A frame must be a JSON object.")
            if "id" in frame and request_id is None:
                raise bad_request(f"id must be a string of at most {MAX_ID} characters.")
            kind = frame.get("type")
            handler = self.handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise bad_request(f"Unknown frame type: {str(kind)[:40]!r}.")
            _check_text(frame)
            await handler(self, frame, request_id)
        except FrameError as exc:
            await self.send_error(exc.code, exc.message, request_id)
        except Exception:
            # A database or Redis failure must not close the socket and
            # every subscription on it: say so and stay usable.
            logger.exception("frame %r failed", frame.get("type"))
            await self.send_error(
                "server_error", "Something went wrong on the server; try again.", request_id
            )

    async def send_error(self, code: str, message: str, request_id: str | None = None) -> None:
        frame = {"type": "error", "code": code, "message": message}
        if request_id is not None:
            frame["id"] = request_id
        await self.send_json(frame)

    async def send_frame(self, frame: dict[str, Any], request_id: str | None) -> None:
        if request_id is not None:
            frame = {**frame, "id": request_id}
        await self.send_json(frame)

    # Client frames.

    async def on_send(self, frame: dict, request_id: str | None) -> None:
        content = frame.get("content")
        if not isinstance(content, str):
            raise bad_request("content must be a string.")
        if len(content) > settings.CHAT_MAX_CONTENT:
            raise FrameError(
                "too_large", f"A message is limited to {settings.CHAT_MAX_CONTENT} characters."
            )
        if not content.strip():
            raise bad_request("content must not be empty.")
        model = _optional_str(frame, "model", 200)
        system = _optional_str(frame, "system", settings.CHAT_MAX_CONTENT)
        options = _options(frame.get("options"))
        conversation_id = frame.get("conversation")
        if conversation_id is not None:
            conversation_id = _conversation_id(frame)
        await self.check_rate()
        default_model = await llm.default_model()
        try:
            conversation, created, changed, user_message, reply = await _begin_send(
                self.user, conversation_id, content, model, system, options, default_model
            )
        except Conversation.DoesNotExist:
            raise FrameError("not_found", NOT_FOUND) from None
        except Busy:
            raise FrameError("busy", BUSY) from None
        await self.subscribe(conversation)
        if created:
            await self.send_frame(conversation_frame(conversation), request_id)
        elif changed:
            await self.broadcast(conversation.pk, conversation_frame(conversation))
        message_frame = {
            "type": "message",
            "conversation": str(conversation.pk),
            "message": user_message.as_frame(),
        }
        await self.send_frame(message_frame, request_id)
        await self.broadcast(conversation.pk, message_frame, skip_self=True)
        self.hold(str(reply.pk), 0, str(conversation.pk))
        replies.start(conversation, reply, self.channel_name, request_id)

    async def on_stop(self, frame: dict, request_id: str | None) -> None:
        conversation = await self.own_conversation(frame)
        reply = await database_sync_to_async(conversation.reply_in_progress)()
        if reply is not None:
            await replies.request_stop(conversation.pk, reply.pk)

    async def on_regenerate(self, frame: dict, request_id: str | None) -> None:
        conversation = await self.own_conversation(frame)
        await self.check_rate()
        model = conversation.model or await llm.default_model()
        try:
            _, reply, superseded = await database_sync_to_async(conversation.start_turn)(
                None, model, conversation.options
            )
        except Busy:
            raise FrameError("busy", BUSY) from None
        except NothingToAnswer:
            raise bad_request("There is no message to answer in this conversation.") from None
        await self.subscribe(conversation)
        if superseded is not None:
            await self.broadcast(
                conversation.pk,
                {
                    "type": "message",
                    "conversation": str(conversation.pk),
                    "message": superseded.as_frame(),
                },
            )
        self.hold(str(reply.pk), 0, str(conversation.pk))
        replies.start(conversation, reply, self.channel_name, request_id)

    async def on_subscribe(self, frame: dict, request_id: str | None) -> None:
        conversation = await self.own_conversation(frame)
        # Join the group first: every delta after the snapshots below
        # reaches us, and held[] drops the ones the snapshots already hold.
        await self.subscribe(conversation)
        await self.send_frame(conversation_frame(conversation), request_id)
        messages = await database_sync_to_async(list)(conversation.visible_messages())
        for message in messages:
            await self.send_frame(
                {
                    "type": "message",
                    "conversation": str(conversation.pk),
                    "message": await self.current_frame(message),
                },
                request_id,
            )

    async def on_unsubscribe(self, frame: dict, request_id: str | None) -> None:
        conversation_id = _conversation_id(frame)
        if conversation_id in self.subscriptions:
            self.subscriptions.discard(conversation_id)
            for message_id, held_in in list(self.held_in.items()):
                if held_in == conversation_id:
                    self.release(message_id)
            await self.channel_layer.group_discard(
                replies.conversation_group(conversation_id), self.channel_name
            )

    async def on_ping(self, frame: dict, request_id: str | None) -> None:
        await self.send_frame({"type": "pong"}, request_id)

    handlers = {
        "send": on_send,
        "stop": on_stop,
        "regenerate": on_regenerate,
        "subscribe": on_subscribe,
        "unsubscribe": on_unsubscribe,
        "ping": on_ping,
    }

    # Helpers.

    async def own_conversation(self, frame: dict) -> Conversation:
        conversation_id = _conversation_id(frame)
        try:
            return await Conversation.objects.for_user(self.user).aget(pk=conversation_id)
        except Conversation.DoesNotExist:
            raise FrameError("not_found", NOT_FOUND) from None

    async def check_rate(self) -> None:
        if not await _allow_send(self.user.pk):
            raise FrameError("rate_limited", "Too many messages; wait a minute and try again.")

    def hold(self, message_id: str, seq: int, conversation_id: str) -> None:
        self.held[message_id] = seq
        self.heard[message_id] = time.monotonic()
        self.held_in[message_id] = conversation_id

    def release(self, message_id: str) -> None:
        self.held.pop(message_id, None)
        self.heard.pop(message_id, None)
        self.held_in.pop(message_id, None)

    async def watch_replies(self) -> None:
        """A reply whose process died never sends its end. After three
        heartbeats of silence, look it up: current_frame() ends it for every
        tab if its writer is gone, and resends it if we only missed events."""
        beat = Message.HEARTBEAT.total_seconds()
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(beat)
            now = time.monotonic()
            if now - renewed > RENEW_EVERY:
                renewed = now
                await self.renew()
            for message_id in [m for m, t in self.heard.items() if now - t > 3 * beat]:
                self.heard[message_id] = now
                message = await Message.objects.filter(pk=message_id).afirst()
                if message is None:
                    self.release(message_id)
                    continue
                frame = await self.current_frame(message)
                await self.send_json(
                    {
                        "type": "message",
                        "conversation": str(message.conversation_id),
                        "message": frame,
                    }
                )

    async def renew(self) -> None:
        """Group memberships expire after a day in the channel layer, and a
        token may have been deleted or its user deactivated without a word
        to this socket: renew the one, re-check the other."""
        groups = [replies.conversation_group(c) for c in self.subscriptions]
        if self.token is not None:
            if (
                not await ApiToken.objects.active()
                .filter(pk=self.token.pk, user__is_active=True)
                .aexists()
            ):
                await self.close(code=CLOSE_TOKEN_REVOKED)
                return
            groups.append(self.token.group)
        for group in groups:
            await self.channel_layer.group_add(group, self.channel_name)

    async def subscribe(self, conversation: Conversation) -> None:
        # Always group_add: it also renews a membership the layer would
        # otherwise expire after a day.
        conversation_id = str(conversation.pk)
        self.subscriptions.add(conversation_id)
        await self.channel_layer.group_add(
            replies.conversation_group(conversation_id), self.channel_name
        )

    async def broadcast(self, conversation_id: Any, frame: dict, skip_self: bool = False) -> None:
        event = {"type": "chat.event", "conversation": str(conversation_id), "frame": frame}
        if skip_self:
            event["skip"] = self.channel_name
        await self.channel_layer.group_send(replies.conversation_group(conversation_id), event)

    async def current_frame(self, message: Message) -> dict[str, Any]:
        """A message as it is now: for a reply in progress, the snapshot of
        the process writing it, which is newer than the database."""
        frame = None
        if message.is_live:
            frame = await replies.snapshot(message.conversation_id, message.pk)
            if frame is None:
                message = await Message.objects.aget(pk=message.pk)
                if message.is_stale():
                    # Its writer died: tell every tab still waiting for it.
                    await database_sync_to_async(message.mark_interrupted)()
                    await self.broadcast(message.conversation_id, end_frame(message))
        if frame is None:
            frame = message.as_frame()
        if frame["status"] in Message.LIVE_STATUSES:
            self.hold(str(message.pk), frame["seq"], str(message.conversation_id))
        else:
            self.release(str(message.pk))
        return frame

    # Channel-layer events.

    async def chat_alive(self, event: dict) -> None:
        if event["message"] in self.heard:
            self.heard[event["message"]] = time.monotonic()

    async def chat_event(self, event: dict) -> None:
        frame = event["frame"]
        if event.get("skip") == self.channel_name:
            return
        conversation_id = event.get("conversation")
        if conversation_id is not None and conversation_id not in self.subscriptions:
            return  # arrived after an unsubscribe
        if frame["type"] == "start":
            # A snapshot taken after the start may already hold a later seq.
            self.hold(frame["message"], self.held.get(frame["message"], 0), conversation_id)
        elif frame["type"] == "delta":
            message_id, seq = frame["message"], frame["seq"]
            held = self.held.get(message_id, seq - 1)
            if seq <= held:
                return
            if seq > held + 1:
                # A delta went missing (a full channel, say): resend the
                # whole reply as a snapshot rather than show a gap.
                logger.warning("gap in reply %s: held %d, got %d", message_id, held, seq)
                message = await Message.objects.aget(pk=message_id)
                snapshot = await self.current_frame(message)
                await self.send_json(
                    {"type": "message", "conversation": conversation_id, "message": snapshot}
                )
                return
            self.hold(message_id, seq, conversation_id)
        elif frame["type"] == "end":
            self.release(frame["message"])
        await self.send_json(frame)

    async def token_revoked(self, event: dict) -> None:
        await self.close(code=CLOSE_TOKEN_REVOKED)

    @classmethod
    async def encode_json(cls, content: dict) -> str:
        return json.dumps(content, ensure_ascii=False)


def end_frame(message: Message) -> dict[str, Any]:
    frame = message.as_frame()
    return {
        "type": "end",
        "conversation": str(message.conversation_id),
        "message": frame["id"],
        "status": frame["status"],
        "seq": frame["seq"],
        "usage": frame["usage"],
        "timing": frame["timing"],
        "error": frame["error"],
    }


def conversation_frame(conversation: Conversation) -> dict[str, Any]:
    return {"type": "conversation", "conversation": conversation.as_frame()}


def _conversation_id(frame: dict) -> str:
    value = frame.get("conversation")
    if not isinstance(value, str):
        raise bad_request("conversation must be a conversation id.")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise FrameError("not_found", NOT_FOUND) from None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no database can store it
        return False
    return True


def _check_text(frame: dict) -> None:
    for name in ("content", "system", "model"):
        value = frame.get(name)
        if isinstance(value, str) and not _encodable(value):
            raise bad_request(f"{name} is not valid Unicode text.")


def _optional_str(frame: dict, name: str, limit: int) -> str | None:
    value = frame.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string.")
    if len(value) > limit:
        raise FrameError("too_large", f"{name} is limited to {limit} characters.")
    return value


def _options(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("options must be an object.")
    options = {}
    for name, (kind, low, high) in OPTION_RANGES.items():
        option = value.get(name)
        if option is None:
            continue
        if isinstance(option, bool) or not isinstance(option, (int, float)):
            raise bad_request(f"options.{name} must be a number.")
        if not low <= option <= high:
            raise bad_request(f"options.{name} must be between {low} and {high}.")
        if kind is int and not float(option).is_integer():
            raise bad_request(f"options.{name} must be a whole number.")
        options[name] = kind(option)
    return options


async def _allow_send(user_id: int) -> bool:
    key = f"chat-sends:{user_id}"
    # One counter per user per minute, shared by every process when the
    # cache is Redis.
    if await cache.aadd(key, 1, timeout=60):
        return True
    try:
        return await cache.aincr(key) <= settings.CHAT_RATE_LIMIT
    except ValueError:  # expired between add and incr
        await cache.aset(key, 1, timeout=60)
        return True


@database_sync_to_async
@transaction.atomic
def _begin_send(user, conversation_id, content, model, system, options, default_model):
    """The conversation, whether it is new or its settings changed, the
    saved user message and the reply row, in one trip to the database."""
    conversation, created, changed = Conversation.objects.for_send(
        user,
        conversation_id,
        model=model,
        system=system,
        options=options,
        default_model=default_model,
    )
    user_message, reply, _ = conversation.start_turn(
        content, conversation.model, conversation.options
    )
    return conversation, created, changed, user_message, reply


_swept = False


async def _interrupt_orphans_once() -> None:
    """Replies left streaming by a process that died: the first socket of a
    process clears them up, whatever server runs us."""
    global _swept
    if not _swept:
        _swept = True
        await database_sync_to_async(Message.objects.interrupt_orphans)()
