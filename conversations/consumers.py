"""The WebSocket protocol v1 (docs/protocol.md) over one socket: validate a
frame (protocol.py), check permission, hand off to the models and to
replies.py. What the socket holds of each live reply is in tracking.py."""

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any, cast

from asgiref.sync import sync_to_async
from channels.auth import UserLazyObject
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from . import llm, protocol, replies
from .budget import FrameBudget
from .models import ApiToken, Busy, Conversation, Message, NothingToAnswer, Turn
from .protocol import ErrorCode, FrameError
from .ratelimit import allow_send
from .signins import SignIn, aepoch, user_group
from .tracking import HeldReplies, Verdict

logger = logging.getLogger(__name__)

RENEW_EVERY = 3600  # seconds
LEAVE_TIMEOUT = 5  # seconds a dead socket spends leaving its groups


class ChatConsumer(AsyncJsonWebsocketConsumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user: UserLazyObject | None = None
        self.token: ApiToken | None = None
        self.subscriptions: set[str] = set()
        # Subscribed conversations this socket has had in full, with nothing
        # sent about them since: a subscribe again need not replay them.
        self.up_to_date: set[str] = set()
        self.held = HeldReplies()
        self.watchdog: asyncio.Task | None = None
        self.budget = FrameBudget(settings.CHAT_FRAME_RATE, settings.CHAT_FRAME_BURST)
        self.closing = False  # closed by us; frames still queued are dropped
        self.sign_in: SignIn | None = None
        self.epoch: str | None = None
        self.left = False  # the channel layer's groups, on the way out

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A consumer whose channel layer fails (Redis gone) dies without
            # disconnect(): its watchdog would otherwise run on for ever, and
            # its groups would send to a dead channel for a day.
            if self.watchdog is not None:
                self.watchdog.cancel()
            if not self.left and hasattr(self, "channel_name"):
                try:
                    async with asyncio.timeout(LEAVE_TIMEOUT):
                        await self.leave_groups()
                except TimeoutError:
                    logger.warning("a dead socket's groups could not be left in time")

    async def connect(self) -> None:
        self.user = self.scope.get("user")
        if self.user is None or not self.user.is_authenticated:
            await self.close()
            return
        # Set by auth.TokenAuthMiddleware; the scope's values are typed object.
        self.token = cast("ApiToken | None", self.scope.get("api_token"))
        session = self.scope.get("session")
        self.sign_in = SignIn(
            self.user.pk,
            session_key=None if self.token or session is None else session.session_key or "",
            token_id=self.token.pk if self.token else None,
        )
        # Join and read the epoch before checking: a sign-out from here on
        # reaches this socket one way or the other.
        await self.channel_layer.group_add(user_group(self.user.pk), self.channel_name)
        self.epoch = await aepoch(self.user.pk)
        if not await database_sync_to_async(self.sign_in.holds)():
            await self.close()
            return
        if self.token is not None:
            await self.channel_layer.group_add(self.token.group, self.channel_name)
        await self.accept()
        self.watchdog = asyncio.create_task(self.watch_replies())
        await replies.sweep_orphans_once()
        try:
            models, state = await llm.list_models(), "ok"
        except llm.LLMError:
            models, state = [], "unavailable"
        user = self.user.get_username()
        await self.send_json(protocol.ready_frame(user, models, await llm.default_model(), state))

    async def disconnect(self, code: int) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        await self.leave_groups()

    async def leave_groups(self) -> None:
        self.left = True
        groups = [replies.conversation_group(c) for c in self.subscriptions]
        if self.sign_in is not None:
            groups.append(user_group(self.user_id))
        if self.token is not None:
            groups.append(self.token.group)
        # Each on its own: one failed discard (Redis away for a moment) must
        # not leave the rest of the socket's groups sending to a dead channel.
        for group in groups:
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except Exception:
                logger.exception("leaving %s failed", group)

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        if self.closing:
            return
        wait = self.budget.take()
        if wait:
            await self.refuse(text_data, wait)
            return
        if not await self.still_signed_in():
            return
        try:
            frame = protocol.decode(text_data)
        except FrameError as exc:
            await self.send_json(exc.frame())
            return
        await self.receive_json(frame)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        frame = content  # the base class's name for it
        request_id = protocol.request_id(frame)
        try:
            handler = self.handlers[protocol.frame_type(frame)]
            await handler(self, frame, request_id)
        except FrameError as exc:
            await self.send_json(exc.frame(request_id))
        except Exception:
            # A database or Redis failure must not close the socket and
            # every subscription on it: say so and stay usable.
            logger.exception("frame %r failed", frame.get("type"))
            error = protocol.error_frame(
                ErrorCode.SERVER_ERROR, protocol.SERVER_ERROR_TEXT, request_id
            )
            await self.send_json(error)

    async def refuse(self, text_data: str | None, wait: float) -> None:
        """A frame past the budget: rate_limited, and a close for a client
        that goes on regardless."""
        if self.budget.overrun:
            await self.close_socket(protocol.CLOSE_TOO_MANY_FRAMES)
            return
        try:
            request_id = protocol.request_id(protocol.decode(text_data))
        except FrameError:
            request_id = None
        await self.send_json(protocol.frames_rate_limited(math.ceil(wait)).frame(request_id))

    async def still_signed_in(self) -> bool:
        """Whether the socket's sign-in still stands (signins.py); closes the
        socket with 4003 if not. One cache read, unless the epoch moved."""
        epoch = await aepoch(self.user_id)
        if epoch == self.epoch:
            return True
        if self.sign_in is not None and await database_sync_to_async(self.sign_in.holds)():
            self.epoch = epoch
            return True
        await self.close_socket(protocol.CLOSE_SIGNED_OUT)
        return False

    @property
    def user_id(self) -> int:
        if self.user is None:  # connect() closed a socket without one
            raise RuntimeError("no user on this socket")
        return self.user.pk

    async def close_socket(self, code: int) -> None:
        self.closing = True
        await self.close(code=code)

    async def send_frame(self, frame: Any, request_id: str | None = None) -> None:
        """Send a frame, in pieces each under the WebSocket size limit: one
        too big closes the socket, and a snapshot too big would do so on
        every subscribe of its conversation."""
        for piece in protocol.fitted(frame):
            if request_id is not None:
                piece = {**piece, "id": request_id}
            await self.send_json(piece)

    # Client frames.

    async def on_send(self, frame: dict, request_id: str | None) -> None:
        request = protocol.send_request(frame)
        turn = await self.begin_turn(Conversation.objects.begin_send, request)
        conversation = turn.conversation
        await self.subscribe(conversation)
        if turn.created:
            await self.send_frame(protocol.conversation_frame(conversation), request_id)
        elif turn.changed:
            await replies.broadcast(conversation.pk, protocol.conversation_frame(conversation))
        message = protocol.message_frame(conversation.pk, turn.user_message.as_frame())
        await self.send_frame(message, request_id)
        await replies.broadcast(conversation.pk, message, skip=self.channel_name)
        self.start_reply(conversation, turn.reply, request_id)

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
        except Conversation.DoesNotExist:
            raise FrameError(ErrorCode.NOT_FOUND, protocol.NOT_FOUND_TEXT) from None
        except Busy as busy:
            raise protocol.busy(busy.reply_id) from None
        except NothingToAnswer:
            raise protocol.bad_request(protocol.NOTHING_TO_ANSWER_TEXT) from None
        await self.subscribe(conversation)
        if superseded is not None:
            superseded_frame = protocol.message_frame(conversation.pk, superseded.as_frame())
            await replies.broadcast(conversation.pk, superseded_frame)
        self.start_reply(conversation, reply, request_id)

    async def on_subscribe(self, frame: dict, request_id: str | None) -> None:
        conversation = await self.own_conversation(frame)
        # Replaying a whole conversation the socket already holds, on every
        # subscribe, let one socket grow the server by gigabytes.
        unchanged = str(conversation.pk) in self.up_to_date
        # Join the group first: every delta after the snapshots below
        # reaches us, and self.held drops the ones the snapshots already hold.
        await self.subscribe(conversation)
        await self.replay(conversation, request_id, only_live=unchanged)

    async def on_edit(self, frame: dict, request_id: str | None) -> None:
        request = protocol.edit_request(frame)
        turn = await self.begin_turn(Conversation.objects.begin_edit, request)
        conversation = turn.conversation
        await self.subscribe(conversation)
        if turn.changed:
            await replies.broadcast(conversation.pk, protocol.conversation_frame(conversation))
        await self.show_path(conversation, request_id, new_reply=turn.reply)
        self.start_reply(conversation, turn.reply, request_id)

    async def on_switch(self, frame: dict, request_id: str | None) -> None:
        _, message_id = protocol.switch_request(frame)
        conversation = await self.own_conversation(frame)
        try:
            await database_sync_to_async(conversation.switch)(message_id)
        except Message.DoesNotExist:
            raise FrameError(ErrorCode.NOT_FOUND, protocol.NO_SUCH_MESSAGE_TEXT) from None
        await self.subscribe(conversation)
        await self.show_path(conversation, request_id)

    async def show_path(
        self, conversation: Conversation, request_id: str | None, new_reply: Message | None = None
    ) -> None:
        """Answer an edit or a switch with the new active path, and have
        every other socket subscribed to the conversation, in any process,
        replay it too: two tabs stay on the same branch."""
        await replies.broadcast_path(conversation.pk, skip=self.channel_name)
        await self.replay(conversation, request_id, with_path=True, new_reply=new_reply)

    async def replay(
        self,
        conversation: Conversation,
        request_id: str | None,
        *,
        only_live: bool = False,
        with_path: bool = False,
        new_reply: Message | None = None,
    ) -> None:
        """Send the conversation and its active path: each message as it is
        now (a live reply from the process writing it), oldest first; or,
        only_live, the replies of the path still in progress. A live reply
        off the path is not this socket's to show until a switch brings it
        back: its events are dropped. new_reply, just made, is sent as it
        was saved (its writer has not started yet)."""
        conversation_id = str(conversation.pk)
        try:
            messages, off_path = await database_sync_to_async(conversation.replay)(only_live)
        except Conversation.DoesNotExist:
            raise FrameError(ErrorCode.NOT_FOUND, protocol.NOT_FOUND_TEXT) from None
        if only_live:
            answer: Any = protocol.resubscribed_frame(conversation)
        elif with_path:
            answer = protocol.path_frame(conversation, [m.pk for m in messages])
        else:
            answer = protocol.conversation_frame(conversation)
        for message_id in off_path:
            self.held.ignore(str(message_id), conversation_id)
        await self.send_frame(answer, request_id)
        try:
            for message in messages:
                if new_reply is not None and message.pk == new_reply.pk:
                    snapshot: Any = protocol.message_frame(conversation_id, message.as_frame())
                else:
                    snapshot = await self.current_frame(message)
                await self.send_frame(snapshot, request_id)
        except Message.DoesNotExist:
            # The conversation was deleted while it was replayed (a `deleted`
            # frame follows): answer as if it had been gone before.
            raise FrameError(ErrorCode.NOT_FOUND, protocol.NOT_FOUND_TEXT) from None
        # Events that arrived meanwhile wait behind this frame, and will
        # take the conversation out of up_to_date again.
        self.up_to_date.add(conversation_id)

    async def on_unsubscribe(self, frame: dict, request_id: str | None) -> None:
        await self.leave(protocol.conversation_id(frame))

    async def on_ping(self, frame: dict, request_id: str | None) -> None:
        await self.send_frame(protocol.pong_frame(), request_id)

    async def on_feedback(self, frame: dict, request_id: str | None) -> None:
        request = protocol.feedback_request(frame)
        try:
            message = await Message.objects.for_user(self.user).aget(
                pk=request.message, conversation_id=request.conversation, superseded=False
            )
        except Message.DoesNotExist:
            raise FrameError(ErrorCode.NOT_FOUND, protocol.NO_SUCH_REPLY_TEXT) from None
        feedback = await database_sync_to_async(message.rate)(request.rating, request.comment)
        answer = protocol.feedback_frame(
            request.conversation, request.message, feedback.as_frame() if feedback else None
        )
        await self.send_frame(answer, request_id)
        await replies.broadcast(request.conversation, answer, skip=self.channel_name)

    handlers = {
        "send": on_send,
        "stop": on_stop,
        "regenerate": on_regenerate,
        "subscribe": on_subscribe,
        "unsubscribe": on_unsubscribe,
        "ping": on_ping,
        "feedback": on_feedback,
        "edit": on_edit,
        "switch": on_switch,
    }

    # Helpers.

    async def begin_turn(self, begin: Callable[..., Turn], request: Any) -> Turn:
        """A send or an edit: the rate limit and the model checked, then
        begin (ConversationQuerySet.begin_send or begin_edit) saves the
        user's message and the reply row, in a worker thread."""
        await self.check_rate()
        if request.model is not None and not await llm.model_exists(request.model):
            raise protocol.model_not_found(request.model)
        default_model = await llm.default_model()
        try:
            return await database_sync_to_async(begin)(self.user, request, default_model)
        except Conversation.DoesNotExist:
            raise FrameError(ErrorCode.NOT_FOUND, protocol.NOT_FOUND_TEXT) from None
        except Message.DoesNotExist:
            raise FrameError(ErrorCode.NOT_FOUND, protocol.NO_SUCH_MESSAGE_TEXT) from None
        except Busy as busy:
            raise protocol.busy(busy.reply_id) from None

    async def own_conversation(self, frame: dict) -> Conversation:
        conversation_id = protocol.conversation_id(frame)
        try:
            return await Conversation.objects.for_user(self.user).aget(pk=conversation_id)
        except Conversation.DoesNotExist:
            raise FrameError(ErrorCode.NOT_FOUND, protocol.NOT_FOUND_TEXT) from None

    async def check_rate(self) -> None:
        if self.user is None:  # connect() closed a socket without one
            raise RuntimeError("check_rate on a socket without a user")
        allowance = await allow_send(self.user.pk)
        if not allowance.allowed:
            raise protocol.rate_limited(allowance.retry_after)

    def start_reply(self, conversation: Conversation, reply: Message, request_id: str | None):
        self.held.hold(str(reply.pk), 0, str(conversation.pk))
        replies.start(conversation, reply, self.channel_name, request_id)

    async def watch_replies(self) -> None:
        """A reply whose process died never sends its end. When one has been
        silent past the dead-writer limit, look it up: replies.current() ends
        it for every tab if its writer is gone, and we resend it if we only
        missed events."""
        beat = Message.HEARTBEAT.total_seconds()
        renewed = time.monotonic()
        while True:
            await asyncio.sleep(beat)
            try:
                now = time.monotonic()
                if now - renewed > RENEW_EVERY:
                    renewed = now
                    await self.renew()
                for message_id in self.held.silent(Message.stale_after().total_seconds()):
                    await self.look_again(message_id)
            except Exception:
                # The database or Redis away for a moment costs this beat,
                # not the watchdog: without it the socket would never again
                # notice a dead writer, and its groups would expire in a day.
                # A reply not looked up is looked up after another silence.
                logger.exception("a socket's watchdog failed; it goes on")
                await sync_to_async(replies.drop_broken_connection)()

    async def look_again(self, message_id: str) -> None:
        message = await database_sync_to_async(Message.objects.for_frame)(message_id)
        try:
            if message is not None:
                await self.send_frame(await self.current_frame(message))
                return
        except Message.DoesNotExist:
            pass  # deleted while we looked (its conversation's `deleted` follows)
        self.held.release(message_id)

    async def renew(self) -> None:
        """Group memberships expire after a day in the channel layer, and a
        token may have been deleted or its user deactivated without a word
        to this socket: renew the one, re-check the other."""
        groups = [replies.conversation_group(c) for c in self.subscriptions]
        groups.append(user_group(self.user_id))
        if self.token is not None:
            if (
                not await ApiToken.objects.active()
                .filter(pk=self.token.pk, user__is_active=True)
                .aexists()
            ):
                await self.close(code=protocol.CLOSE_TOKEN_REVOKED)
                return
            groups.append(self.token.group)
        for group in groups:
            await self.channel_layer.group_add(group, self.channel_name)

    async def subscribe(self, conversation: Conversation) -> None:
        # Always group_add: it also renews a membership the layer would
        # otherwise expire after a day.
        conversation_id = str(conversation.pk)
        self.subscriptions.add(conversation_id)
        self.up_to_date.discard(conversation_id)
        await self.channel_layer.group_add(
            replies.conversation_group(conversation_id), self.channel_name
        )

    async def leave(self, conversation_id: str) -> bool:
        """Unsubscribe; False if the socket was not subscribed."""
        if conversation_id not in self.subscriptions:
            return False
        self.subscriptions.discard(conversation_id)
        self.up_to_date.discard(conversation_id)
        self.held.release_conversation(conversation_id)
        await self.channel_layer.group_discard(
            replies.conversation_group(conversation_id), self.channel_name
        )
        return True

    async def current_frame(self, message: Message) -> protocol.MessageFrame:
        """The message frame of a message as it is now; the socket holds
        what that frame holds."""
        snapshot = await replies.current(message)
        message_id, conversation_id = str(message.pk), str(message.conversation_id)
        self.up_to_date.discard(conversation_id)
        if snapshot["status"] in Message.LIVE_STATUSES:
            self.held.hold(message_id, snapshot["seq"], conversation_id)
        else:
            self.held.release(message_id)
        return protocol.message_frame(conversation_id, snapshot)

    # Channel-layer events.

    async def chat_alive(self, event: dict) -> None:
        self.held.heard(event["message"])

    async def chat_event(self, event: dict) -> None:
        frame = event["frame"]
        conversation_id = event.get("conversation")
        if conversation_id is not None:
            self.up_to_date.discard(conversation_id)
        if event.get("skip") == self.channel_name:
            return
        if conversation_id is not None and conversation_id not in self.subscriptions:
            return  # arrived after an unsubscribe
        about = frame.get("message")
        if self.held.is_ignored(about.get("id") if isinstance(about, dict) else about):
            # A reply off the active path (issue 13): it goes on, unseen
            # here, until a switch replays it.
            if frame["type"] == "end":
                self.held.release(frame["message"])
            return
        if frame["type"] == "start":
            # Starts and deltas come only by replies.broadcast(), which names
            # the conversation; a direct event to one socket is an error.
            assert conversation_id is not None
            self.held.started(frame["message"], conversation_id)
        elif frame["type"] == "delta":
            assert conversation_id is not None
            verdict = self.held.accept(frame["message"], frame["seq"], conversation_id)
            if verdict == Verdict.SKIP:
                return
            if verdict == Verdict.GAP:
                # A delta went missing (a full channel, say): resend the
                # whole reply as a snapshot rather than show a gap.
                logger.warning("gap in reply %s at seq %d", frame["message"], frame["seq"])
                # (Or let it go, if its conversation was deleted meanwhile.)
                await self.look_again(frame["message"])
                return
        elif frame["type"] == "end":
            self.held.release(frame["message"])
        await self.send_frame(frame)

    async def chat_conversation(self, event: dict) -> None:
        """One of the user's conversations changed (a rename, a suggested
        title, its settings): every socket of the user hears of it, to
        show it in its sidebar, whether subscribed to it or not."""
        self.up_to_date.discard(event["conversation"])
        await self.send_frame(event["frame"])

    async def chat_path(self, event: dict) -> None:
        """Another socket edited or switched a conversation this one is
        subscribed to: replay its new active path here too."""
        conversation_id = event["conversation"]
        if event.get("skip") == self.channel_name or conversation_id not in self.subscriptions:
            return
        mine = Conversation.objects.for_user(self.user)
        conversation = await mine.filter(pk=conversation_id).afirst()
        if conversation is None:
            return  # deleted meanwhile: its `deleted` frame follows
        with contextlib.suppress(FrameError):  # deleted while replayed, as above
            await self.replay(conversation, None, with_path=True)

    async def chat_deleted(self, event: dict) -> None:
        if await self.leave(event["conversation"]):
            await self.send_json(protocol.deleted_frame(event["conversation"]))

    async def user_signed_out(self, event: dict) -> None:
        if self.closing:
            return
        try:
            await self.still_signed_in()
        except Exception:
            # A sign-in of this user ended and the check failed (the cache
            # or the database away for a moment). Raised here, it killed the
            # consumer: the page saw 1011, its reconnects were refused, and
            # it never heard why. Closed as signed out, a page asks the site
            # and reconnects if its own session still stands.
            logger.exception("a socket could not re-check its sign-in; closed as signed out")
            await self.close_socket(protocol.CLOSE_SIGNED_OUT)

    async def token_revoked(self, event: dict) -> None:
        await self.close(code=protocol.CLOSE_TOKEN_REVOKED)

    @classmethod
    async def encode_json(cls, content: dict) -> str:
        return protocol.encode(content)
