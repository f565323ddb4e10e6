"""The names, codes, limits and frame shapes of the WebSocket protocol v1
(docs/protocol.md), in one place: a validator per client frame, a builder
per server frame. Nothing here touches the database or the channel layer,
so every rule can be tested as a plain function call."""

import itertools
import json
import unicodedata
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict, TypeVar

import orjson
from django.conf import settings
from django.db import models

if TYPE_CHECKING:
    from .models import Conversation, Message

PROTOCOL = 1
CLOSE_TOKEN_REVOKED = 4001
CLOSE_TOO_SLOW = 4002  # the client left more than CHAT_SEND_BUFFER unread too long
CLOSE_SIGNED_OUT = 4003  # logout, a password change or a deactivated account
CLOSE_TOO_MANY_FRAMES = 4004  # went on sending past the frame budget's refusals
MAX_FRAME = 256 * 1024
MAX_ID = 64
# Also the max_length of the model fields (Conversation.model, Message.model).
MAX_MODEL = 200
# Also the max_length of Feedback.comment.
MAX_COMMENT = 2000
# The client frame types, each handled by one consumer method.
CLIENT_FRAMES = (
    "send",
    "stop",
    "regenerate",
    "subscribe",
    "unsubscribe",
    "ping",
    "feedback",
    "edit",
    "switch",
)
# A `feedback` frame's ratings, as Feedback.Rating names them (lower case).
RATINGS = ("up", "down")
OPTION_RANGES: dict[str, tuple[type, float, float]] = {
    "temperature": (float, 0.0, 2.0),
    "top_p": (float, 0.0, 1.0),
    # The maximum is settings.CHAT_MAX_TOKENS, read when a frame is checked
    # (see option_range); the figure here only shows the shape.
    "max_tokens": (int, 1, 32_000),
    "seed": (int, -(2**63), 2**63 - 1),
}
# end.finish_reason / message.finish_reason of a reply cut at a length cap:
# the model server's max_tokens or the site's CHAT_MAX_TOKENS and
# CHAT_MAX_REPLY_CHARS. The reply's status stays `complete`.
FINISH_LENGTH = "length"


class ErrorCode(models.TextChoices):
    """Every code of docs/protocol.md, plus `interrupted`, which only ever
    appears in a stored reply's error."""

    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    BUSY = "busy"
    RATE_LIMITED = "rate_limited"
    TOO_LARGE = "too_large"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    MODEL_NOT_FOUND = "model_not_found"
    UPSTREAM_ERROR = "upstream_error"
    TIMEOUT = "timeout"
    SERVER_ERROR = "server_error"
    INTERRUPTED = "interrupted"
    TOO_MANY_REPLIES = "too_many_replies"


# What a reply cut off by its own server process says, however it was noticed.
INTERRUPTED_TEXT = "The server stopped while this reply was being written."
NOT_FOUND_TEXT = "No such conversation."
BUSY_TEXT = "A reply is still being written in this conversation."
SERVER_ERROR_TEXT = "Something went wrong on the server; try again."
NOTHING_TO_ANSWER_TEXT = "There is no message to answer in this conversation."
NO_SUCH_REPLY_TEXT = "No such reply in this conversation."
NO_SUCH_MESSAGE_TEXT = "No such message in this conversation."
ONLY_QUESTIONS_TEXT = "Only your own messages can be edited; ask for another reply instead."
ONLY_REPLIES_TEXT = "Only the assistant's replies can be rated."
NOT_FINISHED_TEXT = "A reply can be rated once it has finished."


class FrameError(Exception):
    """A client frame that is refused: becomes an `error` frame."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        retry_after: int | None = None,
        reply: Any = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.reply = reply

    def frame(self, request_id: str | None = None) -> "ErrorFrame":
        return error_frame(
            self.code, self.message, request_id, retry_after=self.retry_after, reply=self.reply
        )


def busy(reply_id: Any) -> FrameError:
    """A send, edit or regenerate refused while reply_id is written: its id
    lets a client showing another version of the conversation go to it."""
    return FrameError(ErrorCode.BUSY, BUSY_TEXT, reply=reply_id)


def bad_request(message: str) -> FrameError:
    return FrameError(ErrorCode.BAD_REQUEST, message)


def model_not_found(model: str) -> FrameError:
    return FrameError(ErrorCode.MODEL_NOT_FOUND, f"The model server has no model {model[:80]!r}.")


def rate_limited(retry_after: int) -> FrameError:
    unit = "second" if retry_after == 1 else "seconds"
    message = f"Too many messages; wait {retry_after} {unit} and try again."
    return FrameError(ErrorCode.RATE_LIMITED, message, retry_after)


def too_many_replies(limit: int, site_wide: bool) -> FrameError:
    if site_wide:
        message = f"The site is writing {limit} replies at once, its limit; try again shortly."
    else:
        message = f"At most {limit} of your replies may be written at once; wait for one to end."
    return FrameError(ErrorCode.TOO_MANY_REPLIES, message)


def option_range(name: str) -> tuple[type, float, float]:
    kind, low, high = OPTION_RANGES[name]
    if name == "max_tokens":
        high = settings.CHAT_MAX_TOKENS
    return kind, low, high


# Client frames.


@dataclass(frozen=True)
class SendRequest:
    conversation: str | None
    content: str
    model: str | None
    system: str | None
    options: dict[str, Any] | None


def decode(text_data: str | None) -> Any:
    """The JSON value of a text frame."""
    if text_data is None:
        raise bad_request("Frames must be JSON text.")
    if len(text_data) > MAX_FRAME:
        raise FrameError(ErrorCode.TOO_LARGE, f"Frames are limited to {MAX_FRAME} characters.")
    try:
        return json.loads(text_data)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise bad_request("That frame is not valid JSON.") from None


def request_id(frame: Any) -> str | None:
    """The id to answer with: None when the frame has none, or none valid
    (an invalid one is refused by frame_type(), and the refusal has no id)."""
    value = frame.get("id") if isinstance(frame, dict) else None
    if not isinstance(value, str) or len(value) > MAX_ID or not _encodable(value):
        return None
    return value


def frame_type(frame: Any) -> str:
    """The type of a frame, one of CLIENT_FRAMES, once it has passed the
    checks that every frame must pass."""
    if not isinstance(frame, dict):
        raise bad_request("A frame must be a JSON object.")
    if "id" in frame and request_id(frame) is None:
        raise bad_request(f"id must be a string of at most {MAX_ID} characters.")
    kind = frame.get("type")
    if kind not in CLIENT_FRAMES:
        raise bad_request(f"Unknown frame type: {str(kind)[:40]!r}.")
    for name in ("content", "system", "model", "comment"):
        value = frame.get(name)
        if isinstance(value, str) and not _encodable(value):
            raise bad_request(f"{name} is not valid Unicode text.")
        if isinstance(value, str) and "\x00" in value:
            # Postgres cannot store U+0000 in text, SQLite can: refuse it on
            # both, so a site behaves the same whatever its database.
            raise bad_request(f"{name} may not contain NUL characters.")
    return kind


def send_request(frame: dict) -> SendRequest:
    content = frame.get("content")
    if not isinstance(content, str):
        raise bad_request("content must be a string.")
    if len(content) > settings.CHAT_MAX_CONTENT:
        raise FrameError(
            ErrorCode.TOO_LARGE,
            f"A message is limited to {settings.CHAT_MAX_CONTENT} characters.",
        )
    if not _visible(content):
        raise bad_request("content must not be empty.")
    model = _optional_str(frame, "model", MAX_MODEL)
    system = _optional_str(frame, "system", settings.CHAT_MAX_CONTENT)
    options = _options(frame.get("options"))
    conversation = None if frame.get("conversation") is None else conversation_id(frame)
    return SendRequest(conversation, content, model, system, options)


@dataclass(frozen=True)
class FeedbackRequest:
    conversation: str
    message: str
    rating: str | None  # one of RATINGS; None takes the feedback back
    comment: str


def feedback_request(frame: dict) -> FeedbackRequest:
    conversation = conversation_id(frame)
    message = frame.get("message")
    if not isinstance(message, str):
        raise bad_request("message must be a message id.")
    try:
        message = str(uuid.UUID(message))
    except ValueError:
        raise FrameError(ErrorCode.NOT_FOUND, NO_SUCH_REPLY_TEXT) from None
    if "rating" not in frame or not (frame["rating"] is None or frame["rating"] in RATINGS):
        raise bad_request('rating must be "up", "down" or null.')
    rating = frame["rating"]
    comment = (_optional_str(frame, "comment", MAX_COMMENT) or "").strip()
    if rating is None and comment:
        raise bad_request("A comment goes with a rating.")
    return FeedbackRequest(conversation, message, rating, comment)


@dataclass(frozen=True)
class EditRequest:
    conversation: str
    message: str  # the user message a new version is written of
    content: str
    model: str | None
    options: dict[str, Any] | None


def edit_request(frame: dict) -> EditRequest:
    """An `edit`: the same rules as a `send` for its text, model and
    options; no system prompt (the conversation's stays)."""
    conversation = conversation_id(frame)
    message = message_id(frame)
    asked = send_request({**frame, "system": None})
    return EditRequest(conversation, message, asked.content, asked.model, asked.options)


def switch_request(frame: dict) -> tuple[str, str]:
    """A `switch`: (conversation, message)."""
    return conversation_id(frame), message_id(frame)


def message_id(frame: dict) -> str:
    """The message a frame names; like conversation ids, a string that is
    not a UUID names no message: not_found."""
    value = frame.get("message")
    if not isinstance(value, str):
        raise bad_request("message must be a message id.")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise FrameError(ErrorCode.NOT_FOUND, NO_SUCH_MESSAGE_TEXT) from None


def conversation_id(frame: dict) -> str:
    """The conversation a frame is about; a well-formed id that is not a
    UUID names no conversation, so it is not_found like any unknown one."""
    value = frame.get("conversation")
    if not isinstance(value, str):
        raise bad_request("conversation must be a conversation id.")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise FrameError(ErrorCode.NOT_FOUND, NOT_FOUND_TEXT) from None


# Characters that draw nothing but are letters or marks to Unicode: the
# Hangul fillers, the braille blank, the combining grapheme joiner, the
# Khmer inherent vowels and the variation selectors.
_BLANK = frozenset(
    "\u115f\u1160\u3164\uffa0\u2800\u034f\u17b4\u17b5" + "".join(map(chr, range(0xFE00, 0xFE10)))
)
# Controls, format characters (zero-width space and joiners, the BOM,
# bidi marks) and separators.
_UNSEEN_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def _visible(text: str) -> bool:
    """Whether the text shows anything: a message of only spaces, zero-width
    characters and blank letters would be an empty bubble to every reader."""
    return any(
        not (
            char.isspace()
            or char in _BLANK
            or "\U000e0100" <= char <= "\U000e01ef"  # variation selectors 17-256
            or unicodedata.category(char) in _UNSEEN_CATEGORIES
        )
        for char in text
    )


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no database can store it
        return False
    return True


def _optional_str(frame: dict, name: str, limit: int) -> str | None:
    value = frame.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string.")
    if len(value) > limit:
        raise FrameError(ErrorCode.TOO_LARGE, f"{name} is limited to {limit} characters.")
    return value


def _options(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("options must be an object.")
    options = {}
    for name in OPTION_RANGES:
        kind, low, high = option_range(name)
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


# Server frames. Ids and codes go out as plain str: channel layers
# serialise frames, and some serialisers take only exact types.


class ErrorDict(TypedDict):
    code: str
    message: str


class ReadyFrame(TypedDict):
    type: str
    user: str
    protocol: int
    models: list[str]
    default_model: str
    llm: str


class ConversationFrame(TypedDict):
    type: str
    conversation: dict[str, Any]


class MessageFrame(TypedDict):
    type: str
    conversation: str
    message: dict[str, Any]
    continues: NotRequired[bool]  # `more` frames follow with the rest of its text


class StartFrame(TypedDict):
    type: str
    conversation: str
    message: str
    model: str
    parent: str | None
    siblings: list[str]


class DeltaFrame(TypedDict):
    type: str
    conversation: str
    message: str
    seq: int
    content: NotRequired[str]
    reasoning: NotRequired[str]


class EndFrame(TypedDict):
    type: str
    conversation: str
    message: str
    status: str
    seq: int
    usage: dict[str, int | None]
    timing: dict[str, float | int | None]
    error: NotRequired[ErrorDict]
    finish_reason: NotRequired[str]


class ErrorFrame(TypedDict):
    type: str
    code: str
    message: str
    conversation: NotRequired[str]
    id: NotRequired[str]
    retry_after: NotRequired[int]
    reply: NotRequired[str]


def ready_frame(user: str, models: list[str], default_model: str, llm: str) -> ReadyFrame:
    return {
        "type": "ready",
        "user": user,
        "protocol": PROTOCOL,
        "models": models,
        "default_model": default_model,
        "llm": llm,
    }


def conversation_frame(conversation: "Conversation") -> ConversationFrame:
    return {"type": "conversation", "conversation": conversation.as_frame()}


def message_frame(conversation_id: Any, message: dict[str, Any]) -> MessageFrame:
    """message is a snapshot: Message.as_frame(), or a live one from the
    process writing the reply."""
    return {"type": "message", "conversation": str(conversation_id), "message": message}


def start_frame(reply: "Message") -> StartFrame:
    return {
        "type": "start",
        "conversation": str(reply.conversation_id),
        "message": str(reply.pk),
        "model": reply.model,
        "parent": str(reply.parent_id) if reply.parent_id else None,
        "siblings": [str(m) for m in reply.siblings()],
    }


def delta_frame(
    conversation_id: Any, message_id: Any, seq: int, content: str, reasoning: str
) -> DeltaFrame:
    frame: DeltaFrame = {
        "type": "delta",
        "conversation": str(conversation_id),
        "message": str(message_id),
        "seq": seq,
    }
    return _with_text(frame, content, reasoning)


def end_frame(message: "Message") -> EndFrame:
    """The end of a reply, as the (possibly unsaved) row says it ended."""
    frame: EndFrame = {
        "type": "end",
        "conversation": str(message.conversation_id),
        "message": str(message.pk),
        "status": str(message.status),
        "seq": message.seq,
        "usage": message.usage(),
        "timing": message.timing(),
    }
    if message.error_code:
        frame["error"] = {"code": str(message.error_code), "message": message.error}
    if message.finish_reason:
        frame["finish_reason"] = message.finish_reason
    return frame


def error_frame(
    code: str,
    message: str,
    request_id: str | None = None,
    conversation: Any = None,
    retry_after: int | None = None,
    reply: Any = None,
) -> ErrorFrame:
    frame: ErrorFrame = {"type": "error", "code": str(code), "message": message}
    if conversation is not None:
        frame["conversation"] = str(conversation)
    if request_id is not None:
        frame["id"] = request_id
    if retry_after is not None:
        frame["retry_after"] = retry_after
    if reply is not None:
        frame["reply"] = str(reply)
    return frame


class FeedbackFrame(TypedDict):
    type: str
    conversation: str
    message: str
    feedback: dict[str, str] | None


def feedback_frame(
    conversation_id: Any, message_id: Any, feedback: dict[str, str] | None
) -> FeedbackFrame:
    """A reply's feedback as it now is (Feedback.as_frame()), or None once
    taken back."""
    return {
        "type": "feedback",
        "conversation": str(conversation_id),
        "message": str(message_id),
        "feedback": feedback,
    }


def deleted_frame(conversation_id: Any) -> dict[str, str]:
    return {"type": "deleted", "conversation": str(conversation_id)}


def pong_frame() -> dict[str, str]:
    return {"type": "pong"}


def frames_rate_limited(retry_after: int) -> FrameError:
    """The per-socket frame budget is spent (CHAT_FRAME_RATE)."""
    unit = "second" if retry_after == 1 else "seconds"
    message = f"Too many frames on this socket; wait {retry_after} {unit} and try again."
    return FrameError(ErrorCode.RATE_LIMITED, message, retry_after)


def path_frame(conversation: "Conversation", path: list[Any]) -> dict[str, Any]:
    """The answer to an `edit` or a `switch`, to every subscriber: the
    conversation with its new active leaf and the ids of the path, root
    first; the path's messages follow as `message` frames. A client drops
    what it shows that is not on the path."""
    return {**conversation_frame(conversation), "path": [str(m) for m in path]}


def resubscribed_frame(conversation: "Conversation") -> dict[str, Any]:
    """The answer to a subscribe on a socket already subscribed: only the
    live replies' snapshots follow it, not the whole conversation again."""
    return {**conversation_frame(conversation), "replay": "live"}


# Frames over the WebSocket size limit. daphne refuses to send a message
# over its websocket_max_message_size (1 MiB by default, counted in bytes
# of the UTF-8 text) and closes the socket with 1011; a stored reply that
# big made its conversation unreadable. So a long text goes out in pieces:
# deltas split into more deltas, a message snapshot into a `message` with
# `continues: true` followed by `more` frames.
FRAME_LIMIT = 1024 * 1024
# Room kept free in every piece for what the consumer adds after the frame
# is built: a request's id is at most 64 characters, at most 6 bytes each
# once JSON-escaped.
FRAME_SPARE = 1024


class MoreFrame(TypedDict):
    type: str
    conversation: str
    message: str
    continues: bool
    content: NotRequired[str]
    reasoning: NotRequired[str]


_Text = TypeVar("_Text", DeltaFrame, MoreFrame)


def _encoded(frame: Any) -> bytes:
    """A server frame as UTF-8 JSON, compact. orjson, several times faster
    than the standard library on the path every delta takes, refuses a lone
    surrogate; the standard library writes it as it is (3 bytes)."""
    try:
        return orjson.dumps(frame)
    except TypeError:
        return json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "surrogatepass"
        )


def encode(frame: Any) -> str:
    """A server frame's text, as the consumer sends it."""
    return _encoded(frame).decode("utf-8", "surrogatepass")


def frame_size(frame: Any) -> int:
    """The frame's size as daphne counts it: bytes of its UTF-8 text. A lone
    surrogate counts its 3 bytes rather than raising here."""
    return len(_encoded(frame))


def _text_size(text: str) -> int:
    return frame_size(text) - 2  # less its quotes


def _fit(text: str, start: int, room: int) -> int:
    """The end of the longest piece of text from start that fits in room
    bytes once JSON-escaped, or nearly: a guess shrunk in proportion to its
    size until it fits, so a piece costs a few encodings, not one per
    character. Pieces are cut between code points, and never between the
    halves of a surrogate pair a string may hold."""
    end = min(len(text), start + room)  # no character is under one byte
    while end - start > 1 and (size := _text_size(text[start:end])) > room:
        end = start + max(1, (end - start) * room // size)
    pair = start + 1 < end < len(text) and "\ud800" <= text[end - 1] <= "\udbff"
    if pair and "\udc00" <= text[end] <= "\udfff":
        end -= 1
    return end


def _pieces(content: str, reasoning: str, rooms: Any) -> list[tuple[str, str]]:
    """content and reasoning cut into (content, reasoning) pieces, each
    fitting the next room that rooms yields, in bytes of escaped text."""
    pieces: list[tuple[str, str]] = []
    at_content = at_reasoning = 0
    while not pieces or at_content < len(content) or at_reasoning < len(reasoning):
        room = next(rooms)
        end = _fit(content, at_content, room)
        piece_content = content[at_content:end]
        at_content = end
        piece_reasoning = ""
        left = room - _text_size(piece_content)
        if at_content == len(content) and at_reasoning < len(reasoning) and left > 6:
            end = _fit(reasoning, at_reasoning, left)
            piece_reasoning = reasoning[at_reasoning:end]
            at_reasoning = end
        pieces.append((piece_content, piece_reasoning))
    return pieces


def _room(frame: Any) -> int:
    """Bytes left for text in a frame whose text fields are empty."""
    return FRAME_LIMIT - FRAME_SPARE - frame_size(frame)


def delta_frames(
    conversation_id: Any, message_id: Any, first_seq: int, content: str, reasoning: str
) -> list[DeltaFrame]:
    """The deltas that carry content and reasoning: one, or several with
    consecutive seq from first_seq when one would be over FRAME_LIMIT."""
    whole = delta_frame(conversation_id, message_id, first_seq, content, reasoning)
    if frame_size(whole) <= FRAME_LIMIT - FRAME_SPARE:
        return [whole]
    empty = delta_frame(conversation_id, message_id, first_seq, "", "")
    room = _room({**empty, "content": "", "reasoning": ""})
    pieces = _pieces(content, reasoning, itertools.repeat(room))
    return [
        delta_frame(conversation_id, message_id, first_seq + index, *piece)
        for index, piece in enumerate(pieces)
    ]


def more_frame(
    conversation_id: Any, message_id: Any, content: str, reasoning: str, continues: bool
) -> MoreFrame:
    """Text to append to the message of the `message` frame before it."""
    frame: MoreFrame = {
        "type": "more",
        "conversation": str(conversation_id),
        "message": str(message_id),
        "continues": continues,
    }
    return _with_text(frame, content, reasoning)


def _with_text(frame: _Text, content: str, reasoning: str) -> _Text:
    """A delta or more frame with the text it carries: an empty field is left out."""
    if content:
        frame["content"] = content
    if reasoning:
        frame["reasoning"] = reasoning
    return frame


def message_frames(conversation_id: Any, message: dict[str, Any]) -> list[MessageFrame | MoreFrame]:
    """The message frame of a snapshot, as frames each under FRAME_LIMIT: the
    frame itself, or one with the start of its text and `continues: true`,
    then `more` frames with the rest, the last with `continues: false`."""
    whole = message_frame(conversation_id, message)
    if frame_size(whole) <= FRAME_LIMIT - FRAME_SPARE:
        return [whole]
    content, reasoning = message.get("content") or "", message.get("reasoning") or ""
    head = message_frame(conversation_id, {**message, "content": "", "reasoning": ""})
    # continues: false, the longer spelling, for the room of every piece.
    tail = more_frame(conversation_id, message["id"], "", "", False)
    tail_room = _room({**tail, "content": "", "reasoning": ""})
    rooms = itertools.chain([_room({**head, "continues": True})], itertools.repeat(tail_room))
    (first_content, first_reasoning), *rest = _pieces(content, reasoning, rooms)
    first: MessageFrame = message_frame(
        conversation_id, {**message, "content": first_content, "reasoning": first_reasoning}
    )
    first["continues"] = True
    frames: list[MessageFrame | MoreFrame] = [first]
    for index, (piece_content, piece_reasoning) in enumerate(rest):
        last = index == len(rest) - 1
        frames.append(
            more_frame(conversation_id, message["id"], piece_content, piece_reasoning, not last)
        )
    return frames


def fitted(frame: Any) -> list[Any]:
    """A frame about to be sent, as frames under FRAME_LIMIT: a message
    snapshot in pieces; deltas are split where they are numbered
    (replies.py), and every other frame is small."""
    if isinstance(frame, dict) and frame.get("type") == "message" and "message" in frame:
        return list(message_frames(frame["conversation"], frame["message"]))
    return [frame]
