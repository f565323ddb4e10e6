"""What one socket holds of each live reply, so that it gets every delta
after its snapshot once: none missed, none repeated (docs/protocol.md,
"Snapshots, seq, gaps and resuming")."""

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class Verdict(StrEnum):
    SEND = "send"  # the next delta: pass it on
    SKIP = "skip"  # already held, in a snapshot or an earlier delta
    GAP = "gap"  # one or more went missing: send a fresh snapshot instead


@dataclass
class Held:
    conversation_id: str
    seq: int
    heard_at: float


class HeldReplies:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.replies: dict[str, Held] = {}
        # Live replies off the active path (issue 13): by conversation.
        self.ignored: dict[str, str] = {}

    def __contains__(self, message_id: str) -> bool:
        return message_id in self.replies

    def hold(self, message_id: str, seq: int, conversation_id: str) -> None:
        """The socket now holds the reply up to seq (a snapshot, a delta)."""
        self.ignored.pop(message_id, None)
        self.replies[message_id] = Held(conversation_id, seq, self.clock())

    def ignore(self, message_id: str, conversation_id: str) -> None:
        """A reply off the path the socket shows: its events are not for it."""
        self.replies.pop(message_id, None)
        self.ignored[message_id] = conversation_id

    def is_ignored(self, message_id: str | None) -> bool:
        return message_id is not None and message_id in self.ignored

    def started(self, message_id: str, conversation_id: str) -> None:
        # A snapshot taken after the start may already hold a later seq.
        held = self.replies.get(message_id)
        self.hold(message_id, held.seq if held else 0, conversation_id)

    def release(self, message_id: str) -> None:
        self.replies.pop(message_id, None)
        self.ignored.pop(message_id, None)

    def release_conversation(self, conversation_id: str) -> None:
        for message_id, held in list(self.replies.items()):
            if held.conversation_id == conversation_id:
                del self.replies[message_id]
        for message_id, ignored_in in list(self.ignored.items()):
            if ignored_in == conversation_id:
                del self.ignored[message_id]

    def heard(self, message_id: str) -> None:
        """The reply's writer is alive (a heartbeat)."""
        held = self.replies.get(message_id)
        if held is not None:
            held.heard_at = self.clock()

    def accept(self, message_id: str, seq: int, conversation_id: str) -> Verdict:
        """What to do with a delta; holds it when it is to be sent. A reply
        this socket has not seen start is taken from its first delta on."""
        held = self.replies.get(message_id)
        position = held.seq if held is not None else seq - 1
        if seq <= position:
            return Verdict.SKIP
        if seq > position + 1:
            return Verdict.GAP
        self.hold(message_id, seq, conversation_id)
        return Verdict.SEND

    def silent(self, longer_than: float) -> list[str]:
        """The replies not heard from for longer than that many seconds.
        Each is counted as heard now, so it is looked up once per silence."""
        now = self.clock()
        quiet = [m for m, held in self.replies.items() if now - held.heard_at > longer_than]
        for message_id in quiet:
            self.replies[message_id].heard_at = now
        return quiet
