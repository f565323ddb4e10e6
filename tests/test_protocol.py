"""The protocol's validators and frame builders, as plain function calls."""

import json
import uuid
from types import SimpleNamespace

import pytest
from asgiref.sync import async_to_sync

from conversations import protocol
from conversations.consumers import ChatConsumer
from conversations.models import Message
from conversations.protocol import ErrorCode, FrameError, SendRequest

CONVERSATION = "0b8f2c36-7d7e-4c4e-9d55-2d8c2f1a0c11"


def refusal(call, *args) -> tuple[str, str]:
    with pytest.raises(FrameError) as caught:
        call(*args)
    return caught.value.code, caught.value.message


def send(**fields) -> dict:
    return {"type": "send", "conversation": None, "content": "hi", **fields}


# decode


@pytest.mark.parametrize(
    ("text", "code"),
    [
        pytest.param(None, "bad_request", id="binary"),
        pytest.param("not json", "bad_request", id="not-json"),
        pytest.param("[" * 100_000 + "]" * 100_000, "bad_request", id="deeply-nested"),
        pytest.param('"' + "x" * protocol.MAX_FRAME + '"', "too_large", id="over-256-KiB"),
    ],
)
def test_decode_refuses(text, code):
    assert refusal(protocol.decode, text)[0] == code


def test_decode_takes_a_frame_of_exactly_the_limit():
    text = '"' + "x" * (protocol.MAX_FRAME - 2) + '"'
    assert protocol.decode(text) == "x" * (protocol.MAX_FRAME - 2)


# request_id and frame_type


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        pytest.param({"type": "ping", "id": "a1"}, "a1", id="a-string"),
        pytest.param({"type": "ping", "id": "x" * 64}, "x" * 64, id="64-characters"),
        pytest.param({"type": "ping", "id": "x" * 65}, None, id="65-characters"),
        pytest.param({"type": "ping", "id": 12}, None, id="a-number"),
        pytest.param({"type": "ping", "id": "\ud800"}, None, id="a-lone-surrogate"),
        pytest.param({"type": "ping"}, None, id="missing"),
        pytest.param(["id", "a1"], None, id="not-an-object"),
    ],
)
def test_request_id(frame, expected):
    assert protocol.request_id(frame) == expected


@pytest.mark.parametrize("kind", protocol.CLIENT_FRAMES)
def test_frame_type_takes_every_client_frame(kind):
    assert protocol.frame_type({"type": kind, "id": "a1"}) == kind


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        pytest.param([1, 2], "A frame must be a JSON object.", id="a-list"),
        pytest.param("send", "A frame must be a JSON object.", id="a-string"),
        pytest.param({"no": "type"}, "Unknown frame type: 'None'.", id="no-type"),
        pytest.param({"type": "dance"}, "Unknown frame type: 'dance'.", id="unknown-type"),
        pytest.param({"type": []}, "Unknown frame type: '[]'.", id="a-list-type"),
        pytest.param({"type": {"a": 1}}, "Unknown frame type: \"{'a': 1}\".", id="an-object-type"),
        pytest.param({"type": "ping", "id": 12}, "id must be a string", id="a-number-id"),
        pytest.param({"type": "ping", "id": "x" * 65}, "id must be a string", id="a-long-id"),
        pytest.param(send(content="\ud800 hi"), "content is not valid", id="surrogate-content"),
        pytest.param(send(system="\udfff"), "system is not valid", id="surrogate-system"),
        pytest.param(send(model="\udfff"), "model is not valid", id="surrogate-model"),
        pytest.param(send(content="a\x00b"), "content may not contain NUL", id="nul-content"),
        pytest.param(send(system="\x00"), "system may not contain NUL", id="nul-system"),
        pytest.param(send(model="m\x00"), "model may not contain NUL", id="nul-model"),
    ],
)
def test_frame_type_refuses_as_bad_request(frame, reason):
    code, message = refusal(protocol.frame_type, frame)
    assert code == "bad_request"
    assert message.startswith(reason)


def test_an_unknown_type_is_named_before_its_text_is_checked():
    assert (
        "Unknown frame type" in refusal(protocol.frame_type, {"type": "x", "content": "\ud800"})[1]
    )


def test_the_consumer_handles_exactly_the_client_frames():
    assert set(ChatConsumer.handlers) == set(protocol.CLIENT_FRAMES)


# send_request


def test_send_request_carries_every_field():
    frame = send(
        conversation=CONVERSATION.upper(),
        content="Hello there",
        model="fake",
        system="",
        options={"temperature": 1, "max_tokens": 5.0, "seed": None, "unknown": "x"},
    )
    assert protocol.send_request(frame) == SendRequest(
        conversation=CONVERSATION,
        content="Hello there",
        model="fake",
        system="",
        options={"temperature": 1.0, "max_tokens": 5},
    )


def test_send_request_leaves_what_is_missing_unset():
    assert protocol.send_request(send()) == SendRequest(None, "hi", None, None, None)


def test_send_request_options_keep_their_kinds():
    options = protocol.send_request(send(options={"temperature": 1, "max_tokens": 7.0})).options
    assert type(options["temperature"]) is float and type(options["max_tokens"]) is int


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        pytest.param({"content": None}, "bad_request", id="no-content"),
        pytest.param({"content": 5}, "bad_request", id="content-a-number"),
        pytest.param({"content": ""}, "bad_request", id="content-empty"),
        pytest.param({"content": " \n\t "}, "bad_request", id="content-whitespace"),
        pytest.param({"content": "\u200b\u200d\ufeff"}, "bad_request", id="content-zero-width"),
        pytest.param({"content": "\u3164 \u2800\xa0"}, "bad_request", id="content-blank-letters"),
        pytest.param({"content": "\u2060\u034f\u180e\n"}, "bad_request", id="content-joiners"),
        pytest.param({"content": "\x01\x7f\x9f"}, "bad_request", id="content-controls"),
        pytest.param({"content": "x" * 32_001}, "too_large", id="content-over-the-limit"),
        pytest.param({"model": 3}, "bad_request", id="model-a-number"),
        pytest.param({"model": "m" * 201}, "too_large", id="model-over-200"),
        pytest.param({"system": ["x"]}, "bad_request", id="system-a-list"),
        pytest.param({"system": "s" * 32_001}, "too_large", id="system-over-the-limit"),
        pytest.param({"conversation": 12}, "bad_request", id="conversation-a-number"),
        pytest.param({"conversation": "not-a-uuid"}, "not_found", id="conversation-not-a-uuid"),
        pytest.param({"options": []}, "bad_request", id="options-a-list"),
        pytest.param({"options": {"temperature": "hot"}}, "bad_request", id="option-a-string"),
        pytest.param({"options": {"top_p": True}}, "bad_request", id="option-a-boolean"),
        pytest.param({"options": {"temperature": 2.5}}, "bad_request", id="temperature-over-2"),
        pytest.param({"options": {"top_p": -0.1}}, "bad_request", id="top_p-under-0"),
        pytest.param({"options": {"max_tokens": 0}}, "bad_request", id="max_tokens-0"),
        pytest.param({"options": {"max_tokens": 2.5}}, "bad_request", id="max_tokens-a-fraction"),
        pytest.param({"options": {"seed": 2**63}}, "bad_request", id="seed-over-2-63"),
        pytest.param({"options": {"seed": float("inf")}}, "bad_request", id="seed-infinite"),
    ],
)
def test_send_request_refuses(fields, code, settings):
    settings.CHAT_MAX_CONTENT = 32_000
    assert refusal(protocol.send_request, send(**fields))[0] == code


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"temperature": 0, "top_p": 1}, id="lowest-temperature-highest-top_p"),
        pytest.param({"temperature": 2.0, "top_p": 0.0}, id="highest-temperature-lowest-top_p"),
        pytest.param({"max_tokens": 32_000, "seed": -(2**63)}, id="max_tokens-and-seed-edges"),
    ],
)
def test_send_request_takes_options_at_their_limits(options):
    assert protocol.send_request(send(options=options)).options == options


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("\U0001f469\u200d\U0001f4bb", id="an-emoji-joined-by-zwj"),
        pytest.param("\u200b.", id="a-dot-after-a-zero-width-space"),
        pytest.param("\u0301", id="a-lone-combining-accent"),
        pytest.param("\u3000\u4e00", id="a-han-character"),
    ],
)
def test_send_request_takes_content_with_something_to_see(content):
    assert protocol.send_request(send(content=content)).content == content


def test_content_limit_is_the_setting(settings):
    settings.CHAT_MAX_CONTENT = 10
    assert protocol.send_request(send(content="x" * 10)).content == "x" * 10
    assert refusal(protocol.send_request, send(content="x" * 11)) == (
        "too_large",
        "A message is limited to 10 characters.",
    )


def test_model_limit_is_the_model_fields_max_length():
    assert Message._meta.get_field("model").max_length == protocol.MAX_MODEL


# conversation_id


@pytest.mark.parametrize(
    ("value", "code"),
    [
        pytest.param(None, "bad_request", id="missing"),
        pytest.param(["x"], "bad_request", id="a-list"),
        pytest.param("not-a-uuid", "not_found", id="not-a-uuid"),
    ],
)
def test_conversation_id_refuses(value, code):
    assert refusal(protocol.conversation_id, {"conversation": value})[0] == code


def test_conversation_id_is_normalised():
    value = "{" + CONVERSATION.upper() + "}"
    assert protocol.conversation_id({"conversation": value}) == CONVERSATION


# ErrorCode


def test_error_codes_are_those_of_the_protocol_document():
    codes = {
        "bad_request",
        "not_found",
        "busy",
        "rate_limited",
        "too_large",
        "upstream_unavailable",
        "model_not_found",
        "upstream_error",
        "timeout",
        "server_error",
        "interrupted",
        "too_many_replies",
    }
    assert {code.value for code in ErrorCode} == codes


def test_error_codes_are_the_choices_of_a_stored_error():
    assert Message._meta.get_field("error_code").choices == ErrorCode.choices


# Frame builders


def reply(**fields) -> Message:
    values = {
        "id": uuid.UUID(int=2),
        "conversation_id": uuid.UUID(int=1),
        "role": "assistant",
        "status": "complete",
        "seq": 3,
        "prompt_tokens": 10,
        "completion_tokens": 6,
        "ttft_ms": 20,
        "duration_ms": 420,
    }
    return Message(**{**values, **fields})


def test_end_frame_of_a_complete_reply():
    assert protocol.end_frame(reply()) == {
        "type": "end",
        "conversation": str(uuid.UUID(int=1)),
        "message": str(uuid.UUID(int=2)),
        "status": "complete",
        "seq": 3,
        "usage": {"prompt_tokens": 10, "completion_tokens": 6},
        "timing": {"ttft_ms": 20, "duration_ms": 420, "tokens_per_s": 15.0},
    }


def test_end_frame_of_a_failed_reply_says_why():
    frame = protocol.end_frame(
        reply(status="interrupted", error_code=ErrorCode.UPSTREAM_ERROR, error="Broke off.")
    )
    assert frame["error"] == {"code": "upstream_error", "message": "Broke off."}
    assert type(frame["error"]["code"]) is str and type(frame["status"]) is str


def test_delta_frame_carries_only_the_text_it_has():
    assert protocol.delta_frame(1, 2, 4, "", "hmm") == {
        "type": "delta",
        "conversation": "1",
        "message": "2",
        "seq": 4,
        "reasoning": "hmm",
    }
    assert "reasoning" not in protocol.delta_frame(1, 2, 4, "yes", "")


def test_start_frame_names_the_reply_its_parent_and_its_versions():
    reply = Message(
        id=uuid.UUID(int=2),
        conversation_id=uuid.UUID(int=1),
        parent_id=uuid.UUID(int=3),
        model="fake",
    )
    reply.sibling_ids = [uuid.UUID(int=4), uuid.UUID(int=2)]

    assert protocol.start_frame(reply) == {
        "type": "start",
        "conversation": str(uuid.UUID(int=1)),
        "message": str(uuid.UUID(int=2)),
        "model": "fake",
        "parent": str(uuid.UUID(int=3)),
        "siblings": [str(uuid.UUID(int=4)), str(uuid.UUID(int=2))],
    }


@pytest.mark.parametrize(
    ("request_id", "conversation", "extra"),
    [
        pytest.param(None, None, {}, id="bare"),
        pytest.param("a1", None, {"id": "a1"}, id="answering-a-frame"),
        pytest.param("a1", 7, {"id": "a1", "conversation": "7"}, id="of-a-failed-reply"),
        pytest.param(None, 7, {"conversation": "7"}, id="of-a-failed-reply-without-id"),
    ],
)
def test_error_frame(request_id, conversation, extra):
    frame = protocol.error_frame(ErrorCode.BUSY, "Busy.", request_id, conversation)
    assert frame == {"type": "error", "code": "busy", "message": "Busy.", **extra}
    assert type(frame["code"]) is str


@pytest.mark.parametrize(
    ("seconds", "text"), [pytest.param(1, "wait 1 second "), pytest.param(42, "wait 42 seconds ")]
)
def test_a_rate_limited_refusal_says_how_long_to_wait(seconds, text):
    frame = protocol.rate_limited(seconds).frame("a1")
    assert (frame["code"], frame["retry_after"], frame["id"]) == ("rate_limited", seconds, "a1")
    assert text in frame["message"]


def test_message_and_conversation_frames():
    conversation = SimpleNamespace(as_frame=lambda: {"id": "1"})
    assert protocol.conversation_frame(conversation) == {
        "type": "conversation",
        "conversation": {"id": "1"},
    }
    assert protocol.message_frame(uuid.UUID(int=1), {"id": "2"}) == {
        "type": "message",
        "conversation": str(uuid.UUID(int=1)),
        "message": {"id": "2"},
    }


def test_ready_frame_says_the_protocol_version():
    frame = protocol.ready_frame("alice", ["fake"], "fake", "ok")
    assert json.loads(json.dumps(frame)) == {
        "type": "ready",
        "user": "alice",
        "protocol": 1,
        "models": ["fake"],
        "default_model": "fake",
        "llm": "ok",
    }


# Frames over the WebSocket size limit (issue 10, item 3)

ROOM = protocol.FRAME_LIMIT - protocol.FRAME_SPARE
MESSAGE = "5d3b1f0e-4c9a-4f4e-8d2b-6f1c0a9e7b21"

# Texts whose size in a frame is not their length: what a splitter that
# counted characters, or bytes before JSON escaping, would get wrong.
BIG_TEXTS = [
    pytest.param("x" * 5_000_000, id="ascii-5MB"),
    pytest.param("あ" * 400_000, id="cjk-400k-characters-1.2MB"),
    pytest.param("😀" * 300_000, id="emoji-300k-characters-1.2MB"),
    pytest.param("\x01" * 200_000, id="controls-escaped-to-6-bytes-each"),
    pytest.param('"\\' * 300_000, id="quotes-and-backslashes"),
    pytest.param("ab\nあ😀\t" * 150_000, id="mixed"),
]


def sizes(frames) -> list[int]:
    return [protocol.frame_size(frame) for frame in frames]


def joined(frames, field: str) -> str:
    return "".join(
        (frame["message"] if frame["type"] == "message" else frame).get(field, "")
        for frame in frames
    )


def test_frame_size_counts_the_bytes_the_consumer_sends():
    frame = protocol.delta_frame(CONVERSATION, MESSAGE, 1, 'あ😀"\x01\n', "")
    text = async_to_sync(ChatConsumer.encode_json)(frame)
    assert protocol.frame_size(frame) == len(text.encode("utf-8"))


def test_a_delta_under_the_limit_is_one_frame():
    frames = protocol.delta_frames(CONVERSATION, MESSAGE, 7, "hello", "hmm")
    assert frames == [protocol.delta_frame(CONVERSATION, MESSAGE, 7, "hello", "hmm")]


@pytest.mark.parametrize("text", BIG_TEXTS)
def test_a_delta_over_the_limit_is_split_into_deltas_numbered_on(text):
    frames = protocol.delta_frames(CONVERSATION, MESSAGE, 4, text, "")
    assert len(frames) > 1
    assert [frame["seq"] for frame in frames] == list(range(4, 4 + len(frames)))
    assert max(sizes(frames)) <= ROOM
    assert joined(frames, "content") == text


def test_content_and_reasoning_over_the_limit_are_both_split_and_kept_apart():
    content, reasoning = "a" * 1_500_000, "思" * 500_000
    frames = protocol.delta_frames(CONVERSATION, MESSAGE, 1, content, reasoning)
    assert max(sizes(frames)) <= ROOM
    assert joined(frames, "content") == content
    assert joined(frames, "reasoning") == reasoning
    assert all(frame.get("content") or frame.get("reasoning") for frame in frames)


def test_a_delta_that_fills_the_room_exactly_stays_one_frame():
    # The text's room: what a frame can hold, less the frame around it.
    around = protocol.frame_size(protocol.delta_frame(CONVERSATION, MESSAGE, 1, "-", "")) - 1
    exact = "x" * (ROOM - around)
    (frame,) = protocol.delta_frames(CONVERSATION, MESSAGE, 1, exact, "")
    assert protocol.frame_size(frame) == ROOM
    assert len(protocol.delta_frames(CONVERSATION, MESSAGE, 1, exact + "x", "")) == 2


def test_the_splitter_never_cuts_a_surrogate_pair():
    # A string may hold a pair as two code points (decoded with
    # surrogatepass, say): a cut between them would leave two lone halves.
    pair = "\ud83d\ude00"
    for lead in range(4):  # every alignment of the pairs against the cut
        text = "x" * lead + pair * 400_000
        frames = protocol.delta_frames(CONVERSATION, MESSAGE, 1, text, "")
        pieces = [frame["content"] for frame in frames]
        assert "".join(pieces) == text
        assert all(not ("\ud800" <= piece[-1] <= "\udbff") for piece in pieces)
        assert all(not ("\udc00" <= piece[0] <= "\udfff") for piece in pieces)


def test_emoji_pieces_are_each_valid_utf8():
    frames = protocol.delta_frames(CONVERSATION, MESSAGE, 1, "😀" * 600_000, "")
    for frame in frames:
        frame["content"].encode("utf-8")  # raises on a broken character
    assert joined(frames, "content") == "😀" * 600_000


def snapshot(content: str, reasoning: str = "") -> dict:
    return {
        "id": MESSAGE,
        "role": "assistant",
        "content": content,
        "reasoning": reasoning,
        "status": "complete",
        "seq": 12,
        "model": "fake",
        "usage": {"prompt_tokens": 3, "completion_tokens": 9},
    }


def test_a_message_under_the_limit_is_one_frame_without_continues():
    message = snapshot("hello", "hmm")
    assert protocol.message_frames(CONVERSATION, message) == [
        protocol.message_frame(CONVERSATION, message)
    ]
    assert "continues" not in protocol.message_frames(CONVERSATION, message)[0]


@pytest.mark.parametrize("text", BIG_TEXTS)
def test_a_message_over_the_limit_continues_in_more_frames(text):
    message = snapshot(text, "思" * 300_000)
    first, *rest = frames = protocol.message_frames(CONVERSATION, message)
    assert first["type"] == "message" and first["continues"] is True
    # Everything but the text is in the message frame, as it always was.
    assert {k: v for k, v in first["message"].items() if k not in ("content", "reasoning")} == {
        k: v for k, v in message.items() if k not in ("content", "reasoning")
    }
    assert rest and all(frame["type"] == "more" for frame in rest)
    assert all(frame["conversation"] == CONVERSATION for frame in rest)
    assert all(frame["message"] == MESSAGE for frame in rest)
    assert [frame["continues"] for frame in rest] == [True] * (len(rest) - 1) + [False]
    assert max(sizes(frames)) <= ROOM
    assert joined(frames, "content") == message["content"]
    assert joined(frames, "reasoning") == message["reasoning"]


def test_fitted_splits_message_snapshots_only():
    big = protocol.message_frame(CONVERSATION, snapshot("x" * 2_500_000))
    assert len(protocol.fitted(big)) == 3
    end = {"type": "end", "conversation": CONVERSATION, "message": MESSAGE, "seq": 3}
    assert protocol.fitted(end) == [end]
