"""Server-sent events, as a model server streams its answer: the bytes cut
into events' data, and each event's JSON read. Pure parsing, no I/O: llm.py
feeds it what the connection reads.

Our own rather than the openai SDK's: its decoder and the pydantic models it
builds for every chunk cost more CPU than everything else the relay does for
a token (docs/performance.md)."""

import json
from typing import Any

import orjson

# An event larger than this is not an answer's piece but a runaway server:
# a delta of the longest reply we keep (CHAT_MAX_REPLY_CHARS), JSON-escaped,
# fits many times over.
MAX_EVENT_BYTES = 16 * 1024 * 1024


class EventTooLarge(ValueError):
    pass


class Events:
    """Feed it the stream's bytes as they come; get back the data of each
    event completed, in order (SSE: `data:` lines, an empty line ends the
    event; comments and other fields are ignored)."""

    def __init__(self) -> None:
        # The line not yet ended, in the pieces it came in: joined only once
        # it ends, so a long line costs its length, not its length squared.
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        if b"\n" not in chunk:
            self.pending.append(chunk)
            self.pending_size += len(chunk)
            if self.pending_size > MAX_EVENT_BYTES:
                raise EventTooLarge(f"an event line of over {MAX_EVENT_BYTES} bytes")
            return []
        if self.pending:
            chunk = b"".join([*self.pending, chunk])
        lines = chunk.split(b"\n")
        rest = lines.pop()
        self.pending, self.pending_size = ([rest], len(rest)) if rest else ([], 0)
        if self.pending_size > MAX_EVENT_BYTES:
            raise EventTooLarge(f"an event line of over {MAX_EVENT_BYTES} bytes")
        events = []
        data = self.data
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data = self.data = []
            elif line.startswith(b"data:"):
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])
                if len(data) > 1 and sum(map(len, data)) > MAX_EVENT_BYTES:
                    raise EventTooLarge(f"an event of over {MAX_EVENT_BYTES} bytes")
        return events

    def finish(self) -> list[bytes]:
        """The stream ended: an event left without its empty line counts."""
        events = self.feed(b"\n\n") if self.pending or self.data else []
        self.pending, self.pending_size, self.data = [], 0, []
        return events


def loads(data: bytes) -> Any:
    """JSON as a model server writes it. orjson refuses a lone surrogate
    escape ("\\ud800", which a UTF-16 server sends when it cuts an emoji in
    two); the standard library keeps it for llm.clean() to mend. Raises
    ValueError (json.JSONDecodeError) for what is not JSON at all."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
